"""Arms the test guards (../guards.py) in every Python child of a guarded test; inert otherwise."""

import os
import sys

if os.environ.get("MONDRIAN_GUARD_LOG"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import guards

    guards.arm(os.environ[guards.GUARD_LOG], tuple(filter(None, os.environ[guards.GUARD_WATCH].split(os.pathsep))))
    sys.path.pop(0)
