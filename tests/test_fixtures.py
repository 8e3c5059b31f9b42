from tests.support.models import top1


def test_tiny_cnn_reaches_ninety_percent_on_held_out_digits(tiny_cnn, digits) -> None:
    _, _, test_x, test_y = digits
    assert top1(tiny_cnn, test_x, test_y) >= 0.90
