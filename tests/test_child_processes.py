"""The test helpers themselves: a hung multi-process child never hangs the suite."""

import sys
import time

import pytest

from helpers import run_process

def test_a_worker_in_its_own_session_is_killed_at_the_deadline():
    # a launcher whose worker starts a session of its own (as torchrun does) and hangs
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
            "start_new_session=True); time.sleep(120)")
    t = time.time()
    with pytest.raises(pytest.fail.Exception, match="still running after 3"):
        run_process([sys.executable, "-c", code], timeout=3)
    assert time.time() - t < 40
