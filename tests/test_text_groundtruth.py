"""Ground truth on the planted-concept model: pairs selected from data (no text) are described by their
concept's word far above chance. The bundled scenes-rn weights ship with the package: failing to load them is a
failure, not a reason to skip."""
import pytest
import torch

from nha_plugin.text import build_dictionary
from nha_plugin.text.groundtruth import data_hit_rate, planted_hit_rate, scene_statistics


@pytest.fixture(scope="module")
def scenes_rn():
    import nha_plugin as nha
    model, _, tokenizer = nha.load_clip("scenes-rn")
    return model, tokenizer


def test_data_selected_pairs_name_their_planted_concept(scenes_rn, tmp_path):
    model, tokenizer = scenes_rn
    words = build_dictionary(model, tokenizer, "scenes", "photo", cache_dir=tmp_path, progress=False)
    torch.manual_seed(0)
    res = data_hit_rate(model, tokenizer, words, statistics=scene_statistics(model, 200))
    assert res["num_pairs_described"] == 48
    # measured 65-73% (control 21-26%) on three scenes-rn checkpoints with 200-300 scenes (issue-6 report);
    # the floors leave room for retraining and scene-sampling noise
    assert res["hit_rate"] >= 0.5
    assert res["hit_rate"] >= res["control_hit_rate"] + 0.25


def test_alignment_selection_is_not_evidence_by_itself(scenes_rn, tmp_path):
    """Selecting pairs by alignment with the word favours the word: random directions score about as high."""
    model, tokenizer = scenes_rn
    words = build_dictionary(model, tokenizer, "scenes", "photo", cache_dir=tmp_path, progress=False)
    res = planted_hit_rate(model, tokenizer, words)
    assert res["hit_rate"] >= 0.6 and res["control_hit_rate"] >= 0.6
