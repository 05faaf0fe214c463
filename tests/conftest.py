import pytest


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=["cpu", "cuda"],
                     help="device for the torch tests (cuda needs a GPU machine)")


@pytest.fixture(scope="session")
def torch_device(request):
    return request.config.getoption("--device")
