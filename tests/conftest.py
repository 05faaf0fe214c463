import pytest


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=["cpu", "cuda"],
                     help="device for the torch tests (cuda needs a GPU machine)")


@pytest.fixture(scope="session")
def torch_device(request):
    return request.config.getoption("--device")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """MSA_COMPILE_LOG=path: each MAX model the test compiled (kind, spec,
    seconds), appended to path; the suite's time is mostly these compiles."""
    import os

    path = os.environ.get("MSA_COMPILE_LOG")
    if not path:
        return (yield)
    from msa_py import engine as E

    n = len(E.compile_log)
    try:
        return (yield)
    finally:
        with open(path, "a") as f:
            for kind, spec, device, sec in E.compile_log[n:]:
                f.write(f"{item.nodeid}\t{kind}\t{device}\t{sec:.1f}\t{spec}\n")
