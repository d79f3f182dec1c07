import pytest
import torch

from defectflow.heads.classifier import SegmentationDecoder, segmentation_loss


def test_decoder_reaches_input_resolution() -> None:
    decoder = SegmentationDecoder([16, 24, 40], width=32)
    features = [torch.randn(2, 16, 32, 32), torch.randn(2, 24, 16, 16), torch.randn(2, 40, 8, 8)]
    assert decoder(features, (64, 96)).shape == (2, 1, 64, 96)


@pytest.mark.parametrize("kind", ["bce", "focal", "dice"])
def test_each_loss_trains_the_decoder_on_a_simple_target(kind: str) -> None:
    torch.manual_seed(0)
    decoder = SegmentationDecoder([4, 8], width=16)
    target = torch.zeros(4, 1, 32, 32)
    target[:, :, 8:20, 8:20] = 0.8  # soft target
    features = [torch.randn(4, 4, 16, 16), torch.randn(4, 8, 8, 8)]
    features[0][:, 0, 4:10, 4:10] += 3.0  # the defect shows in the features
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = segmentation_loss(decoder(features, (32, 32)), target, kind)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_loss_values_hand_checked() -> None:
    logits = torch.full((1, 1, 2, 2), 0.0)
    target = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]])
    assert segmentation_loss(logits, target, "bce").item() == pytest.approx(0.6931, abs=1e-4)  # log 2
    perfect = torch.tensor([[[[20.0, -20.0], [-20.0, -20.0]]]])
    assert segmentation_loss(perfect, (perfect > 0).float(), "dice").item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="Unknown loss"):
        segmentation_loss(logits, target, "hinge")
