import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.interventions import Intervention, get_method
from florain import LowRankHeadMap


def _iv(lm, drop_identity=False):
    heads, dim = lm.spec.site_shape("heads")
    m = LowRankHeadMap(heads, dim, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        m.B.normal_()
        m.s.normal_()
    m.drop_identity = drop_identity
    return Intervention("florain", "heads", {1: m}, {"heads": heads, "head_dim": dim, "drop_identity": drop_identity})


def _logits(lm, iv):
    enc = lm.tokenizer(["Q: Why? A: Because.", "Q: Where is Paris? A: France."], return_tensors="pt", padding=True)
    with torch.no_grad(), iv.applied(lm):
        return lm.model(**enc).logits


@pytest.mark.parametrize("drop_identity", [False, True])
def test_save_load_gives_identical_outputs(tiny_llama, tmp_path, drop_identity):
    iv = _iv(tiny_llama, drop_identity)
    iv.save_pretrained(tmp_path / "iv")
    loaded = Intervention.from_pretrained(tmp_path / "iv")
    assert loaded.method == "florain" and loaded.layers == [1] and loaded.modules[1].drop_identity == drop_identity
    assert torch.equal(_logits(tiny_llama, iv), _logits(tiny_llama, loaded))


def test_saved_intervention_applies_in_another_process(tiny_llama, tmp_path):
    iv = _iv(tiny_llama)
    iv.save_pretrained(tmp_path / "iv")
    expected = _logits(tiny_llama, iv)
    torch.save(expected, tmp_path / "expected.pt")
    code = f"""
import sys
import torch
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from tiny_models import tiny_model
from bench.interventions import Intervention
lm = tiny_model("llama", seed=0)
iv = Intervention.from_pretrained({str(tmp_path / "iv")!r})
iv.check_model(lm)
enc = lm.tokenizer(["Q: Why? A: Because.", "Q: Where is Paris? A: France."], return_tensors="pt", padding=True)
with torch.no_grad(), iv.applied(lm):
    got = lm.model(**enc).logits
assert torch.equal(got, torch.load({str(tmp_path / "expected.pt")!r})), "outputs differ across processes"
print("same")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "same" in proc.stdout


def test_loading_a_non_intervention_dir_fails_clearly(tmp_path):
    from bench.interventions import DamagedInterventionError

    with pytest.raises(DamagedInterventionError, match="not a saved intervention: config.json and "
                       "intervention.safetensors missing"):
        Intervention.from_pretrained(tmp_path)


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match="known methods: .*florain.*none"):
        get_method("magic")


def test_intervention_shape_is_checked(tiny_llama, tiny_gemma):
    iv = _iv(tiny_llama)
    iv.config["head_dim"] = 99
    with pytest.raises(ValueError, match="expects"):
        iv.check_model(tiny_llama)


def test_a_newer_format_is_refused_with_what_to_do(tiny_llama, tmp_path):
    """Saved interventions and results files carry a format version that is checked on load."""
    import json

    from bench.tables import load_results

    path = _iv(tiny_llama).save_pretrained(tmp_path / "iv")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["format_version"] == 1
    (path / "config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99, but this bench reads versions up to 1: upgrade"):
        Intervention.from_pretrained(path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"schema_version": 7, "config": {}, "metrics": {}}))
    with pytest.raises(ValueError, match="results format version 7"):
        load_results([str(run)])
