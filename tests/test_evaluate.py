"""Evaluation through a model: recall on a hand-made case is exact, with several captions per image and
embedding split into several batches."""
import torch
import torch.nn.functional as F

from fne_dist import evaluate as ev
from fne_dist.data import EvalSet

IMAGES = torch.eye(3)
# caption -> owning image: 0, 0, 1, 2, 2
TEXTS = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1, 0.1], [0.1, 0, 1], [0, 0, 1], [0.9, 0, 0.1]]), dim=1)
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 2, 2])


class TableModel(torch.nn.Module):
    """forward(images, tokens) like open_clip's CLIP: images are their own embeddings, tokens index TEXTS."""

    def forward(self, images, tokens):
        image = None if images is None else F.normalize(images, dim=1)
        text = None if tokens is None else TEXTS[tokens[:, 0]]
        return image, text, torch.ones(1)


def eval_set() -> EvalSet:
    return EvalSet(images=IMAGES, tokens=torch.arange(5)[:, None], text_to_image=TEXT_TO_IMAGE,
                   image_ids=torch.tensor([10, 11, 12]), labels=torch.full((3,), -1), skipped=0)


def test_recall_on_a_hand_made_case_is_exact(monkeypatch):
    monkeypatch.setattr(ev, "EVAL_BATCH", 2)  # three image batches, three caption batches
    model = TableModel().train()
    metrics = ev.evaluate(model, eval_set(), torch.device("cpu"))
    # image->text: images 0 and 2 rank one of their captions first; image 1's caption comes second (after t1).
    # text->image: t0 and t3 find their image first; t4 second; t1 and t2 third.
    expected = {"i2t_R@1": 200 / 3, "i2t_R@5": 100.0, "i2t_R@10": 100.0,
                "t2i_R@1": 40.0, "t2i_R@5": 100.0, "t2i_R@10": 100.0}
    for key, value in expected.items():
        assert abs(metrics[key] - value) < 1e-4, key
    assert abs(metrics["rsum"] - sum(expected.values())) < 1e-3
    assert model.training  # restored after evaluation


def test_embeddings_keep_order_across_batches(monkeypatch):
    monkeypatch.setattr(ev, "EVAL_BATCH", 2)
    images, texts = ev.embed(TableModel(), eval_set(), torch.device("cpu"))
    assert torch.equal(images, IMAGES) and torch.equal(texts, TEXTS)
