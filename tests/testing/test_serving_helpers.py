"""The serve tests' helper on the CPU: a server that exits during start-up is
reported by the exception its engine raised, not by the API server's
traceback that ends its log."""

from serving import root_cause

ENGINE_FAILED = """\
(APIServer pid=6864) WARNING 12-06 06:54:21 [system_utils.py:299] Found ulimit \
of 20000. This can cause fd limit errors like `OSError: [Errno 24] Too many \
open files`. Consider increasing with ulimit -n
(EngineCore pid=6945) ERROR 12-06 06:54:53 [core.py:1330] ValueError: To serve \
at least one request with the model's max seq len (4096), (2.04 GiB KV cache \
is needed, which is larger than the available KV cache memory (2.0 GiB).
(APIServer pid=6864) Traceback (most recent call last):
(APIServer pid=6864) RuntimeError: Engine core initialization failed. See root \
cause above. Failed core proc(s): {}
"""


def test_root_cause_is_the_engines_first_exception():
    cause = root_cause(ENGINE_FAILED)
    assert cause.startswith("ValueError: To serve at least one request")
    assert "2.0 GiB" in cause


def test_root_cause_of_a_log_without_an_exception_says_so():
    assert root_cause("INFO started\nkilled\n") == "no error in its log"
