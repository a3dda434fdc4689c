"""`ImagePipeline`: decoded uint8 images of any size in, map, scores and verdicts out.

The one inference path of `python -m anomaly.predict` and of the exported ONNX graph
(`python -m anomaly.export`): the images are resized to the model's size as training resizes
them, scaled to [0, 1] and given to the `AnomalyDetector`; its score is normalized and compared
with the calibrated threshold. Pure torch, so the same module runs eagerly and exports whole.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from anomaly.detector import AnomalyDetector


def _common_factor(size_in: int, size_out: int, device: torch.device) -> Tensor:
    """gcd(size_in, size_out) as a tensor: the largest divisor of the fixed `size_out` that
    divides `size_in`, computed with tensor ops so an exported graph keeps `size_in` free."""
    length = torch.full((), size_in, device=device)
    divisors = [d for d in range(1, size_out + 1) if size_out % d == 0]
    return torch.stack([torch.where(length % d == 0, d, 1) for d in divisors]).amax(dim=0)


def _area_weights(size_in: int, size_out: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """How much of each input pixel every output pixel covers, along one axis.

    With g = gcd(size_in, size_out), an input pixel is size_out / g units long and an output
    pixel size_in / g, so every overlap is a whole number of units.

    Returns:
        float32 overlaps (size_out, size_in), whole numbers, each row summing to size_in / g;
        and the output pixel's length size_in / g (an int64 scalar).
    """
    common = _common_factor(size_in, size_out, device)
    input_pixel = torch.full((), size_out, device=device) // common
    output_pixel = torch.full((), size_in, device=device) // common
    outputs = torch.arange(size_out, device=device).unsqueeze(1)  # (size_out, 1)
    inputs = torch.arange(size_in, device=device).unsqueeze(0)  # (1, size_in)
    start = torch.maximum(outputs * output_pixel, inputs * input_pixel)
    end = torch.minimum((outputs + 1) * output_pixel, (inputs + 1) * input_pixel)
    return (end - start).clamp(min=0).float(), output_pixel


def area_resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize uint8 images (B, H, W, C) to (B, C, h, w) gray levels as training resizes them.

    Every output pixel is the mean of the input area it covers (OpenCV's INTER_AREA, used by
    `anomaly.data.images.resize_rgb`), rounded to a whole level as OpenCV rounds uint8 results:
    halves up for a 2 x 2 reduction, to even otherwise. Identical to OpenCV when shrinking by
    whole factors or keeping the size; otherwise within one level.

    The sums are two matrix products of whole numbers below 2^24 (while (H / gcd(H, h)) *
    (W / gcd(W, w)) <= 65,793: any whole factor, most camera sizes), which float32 holds
    exactly in any order of additions, so every runtime rounds the means alike.

    Returns:
        float32 (B, C, h, w) with integer values in [0, 255].
    """
    height, width = images.shape[1], images.shape[2]
    rows, row_length = _area_weights(height, size[0], images.device)
    columns, column_length = _area_weights(width, size[1], images.device)
    total = rows @ images.permute(0, 3, 1, 2).float() @ columns.T  # (B, C, h, w)
    # mean = total / area: the quotient, and the remainder that decides the rounding.
    area = (row_length * column_length).float()
    quotient = torch.floor(total / area)
    twice_remainder = 2 * (total - quotient * area)
    # A tensor condition, not a Python one: exported graphs keep H and W free.
    halving = (torch.full((), height, device=images.device) == 2 * size[0]) & (
        torch.full((), width, device=images.device) == 2 * size[1]
    )
    halves_up = halving | (torch.remainder(quotient, 2) == 1)
    round_up = (twice_remainder > area) | ((twice_remainder == area) & halves_up)
    return quotient + round_up.float()


class ImagePipeline(nn.Module):
    """uint8 RGB images (B, H, W, 3) of any size -> the detector's verdicts at its image size.

    Args:
        detector: the trained detector (its threshold set, or verdicts are all False and the
            normalized scores nan).
        image_size: (h, w), the size the detector was trained at.
    """

    def __init__(self, detector: AnomalyDetector, image_size: tuple[int, int]) -> None:
        super().__init__()
        self.detector, self.image_size = detector, tuple(image_size)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Score a batch of images of one size.

        Args:
            images: uint8 (B, H, W, 3), RGB, 0-255.

        Returns:
            anomaly_map float32 (B, h, w), score float32 (B,), normalized_score float64 (B,)
            in [0, 1] and anomalous bool (B,).
        """
        inputs = area_resize(images, self.image_size) / 255.0
        # In the weights' memory format, as training and evaluation feed them.
        weights = next(self.detector.net.parameters())
        channels_last = weights.is_contiguous(memory_format=torch.channels_last)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        inputs = inputs.contiguous(memory_format=layout)
        maps, scores, _ = self.detector(inputs)
        return maps, scores, self.detector.normalized_score(scores), self.detector.verdict(scores)
