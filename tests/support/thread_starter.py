"""Starts a Python thread when imported: a warm parent that preloads it is not safe to fork (test_warm_start)."""

import threading
import time

threading.Thread(target=time.sleep, args=(3600,), name="injected-by-a-test", daemon=True).start()
