from tests.ptq.conftest import digits, tiny_net  # noqa: F401 -- the digit CNN and real digits
