"""Evaluation through a model: recall on a hand-made case is exact, with several captions per image and
embedding split into several batches."""
import torch
import torch.nn.functional as F

from fne_dist import evaluate as ev
from fne_dist.data.loader import EvalSet

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


def test_ties_count_against_the_positive():
    """A collapsed model (every image and every caption the same vector) is at or below chance, never perfect."""
    from fne_dist.retrieval import retrieval_metrics

    images = F.normalize(torch.ones(100, 8), dim=1)
    texts = F.normalize(torch.ones(500, 8), dim=1)
    metrics = retrieval_metrics(images, texts, torch.arange(500) // 5)
    chance = {"i2t_R@1": 1.0, "i2t_R@5": 5.0, "i2t_R@10": 10.0, "t2i_R@1": 1.0, "t2i_R@5": 5.0, "t2i_R@10": 10.0}
    assert all(metrics[k] <= chance[k] for k in chance), metrics
    assert metrics["rsum"] == 0.0  # pessimistic: every tied item ranks ahead of the positive


def test_a_tie_with_one_other_item_costs_one_rank():
    from fne_dist.retrieval import retrieval_metrics

    images = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # two identical images
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # caption 0 -> image 0, caption 1 -> image 1
    metrics = retrieval_metrics(images, texts, torch.tensor([0, 1]))
    # t0 ties between images 0 and 1: rank 1 (pessimistic), so R@1 misses it and R@5 holds it
    assert metrics["t2i_R@1"] == 0.0 and metrics["t2i_R@5"] == 100.0
    # image 0: its caption t0 scores 1, alone at the top -> hit; image 1: t0 (not its own) scores above t1 -> miss
    assert metrics["i2t_R@1"] == 50.0


def test_labels_give_the_group_aware_recall(monkeypatch):
    """Where every image has a label (images 0 and 2 one group), evaluate adds the group-aware keys; without labels
    (-1) it reports the exact ones alone."""
    monkeypatch.setattr(ev, "EVAL_BATCH", 2)
    labelled = eval_set()
    labelled.labels = torch.tensor([7, 8, 7])
    metrics = ev.evaluate(TableModel(), labelled, torch.device("cpu"))
    exact = ev.evaluate(TableModel(), eval_set(), torch.device("cpu"))
    assert {k: metrics[k] for k in exact} == exact and not any(k.startswith("group_") for k in exact)
    # text->image: t4 (image 2) finds image 0 first, of its group: now a hit; t1 and t2 still miss
    assert abs(metrics["group_t2i_R@1"] - 60.0) < 1e-4 and abs(exact["t2i_R@1"] - 40.0) < 1e-4
    assert abs(metrics["group_i2t_R@1"] - 200 / 3) < 1e-4
