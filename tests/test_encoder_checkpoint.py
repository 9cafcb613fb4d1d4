"""A VLM recipe's encoder_3d.checkpoint: a pretraining export found from its file, checkpoint or run folder,
local or in object storage, loads the same tensors."""
import pytest
import torch

from components.models.builders import build_encoder
from components.models.config import EncoderSpec
from components.training.stages import MAEStage

ENCODER = {"name": "vit3d", "preset": "tiny_vit", "overrides": {"depth": 1}}


def _export(run, checkpoint: str, seed: int) -> dict[str, torch.Tensor]:
    """An encoder state written where MAE pretraining writes it, beside a stand-in for the whole MAE model."""
    torch.manual_seed(seed)
    state = build_encoder(ENCODER).state_dict()
    full = {**{f"encoder.{k}": v for k, v in state.items()}, "decoder.weight": torch.zeros(2)}
    MAEStage(None).save_model(None, full, str(run / checkpoint / "model"))
    return state


def _loaded(checkpoint: str, storage=None) -> dict[str, torch.Tensor]:
    return build_encoder(EncoderSpec(**ENCODER, checkpoint=checkpoint), storage=storage).state_dict()


def _assert_equal(got: dict, want: dict):
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A pretraining run folder with two checkpoints; returns it and the newer one's encoder state."""
    run = tmp_path_factory.mktemp("pretrain") / "e3d-mae"
    _export(run, "checkpoint_000000", seed=1)
    newest = _export(run, "checkpoint_000001", seed=2)
    return run, newest


def test_file_checkpoint_folder_and_run_folder_load_the_export(run):
    folder, newest = run
    latest = folder / "checkpoint_000001"
    _assert_equal(_loaded(str(latest / "model" / "encoder.safetensors")), newest)
    _assert_equal(_loaded(str(latest / "model")), newest)  # picks the export beside mae.safetensors
    _assert_equal(_loaded(str(latest)), newest)
    _assert_equal(_loaded(str(folder)), newest)  # newest checkpoint wins


def test_run_folder_in_object_storage_loads_through_the_vlm_stage(run, s3_server):
    import s3fs

    from components.config import from_dict
    from components.models.config import VLMConfig
    from components.models.pretraining.contrastive import default_text_encoder_path
    from components.training.stages import VLMStage

    folder, newest = run
    fs = s3fs.S3FileSystem(key=s3_server["key"], secret=s3_server["secret"], endpoint_url=s3_server["endpoint_url"])
    fs.mkdir("pretrain-runs")
    fs.put(str(folder), "pretrain-runs/e3d-mae", recursive=True)
    vlm = from_dict(VLMConfig, {
        "encoder_3d": {**ENCODER, "checkpoint": "s3://pretrain-runs/e3d-mae"},
        # a one-layer Llama with the packaged MiniLM tokenizer: the LLM only has to exist
        "llm": {"source": "config", "tokenizer": default_text_encoder_path(),
                "config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 30522}},
        "tune": {"encoder_3d": "frozen", "llm": "frozen"}})
    model = VLMStage(vlm, "align", ["caption"], storage=s3_server).build_model(None)
    _assert_equal(model.encoder_3d.state_dict(), newest)
    # the saved model config keeps naming the run, not a downloaded copy
    assert model.config.encoder_3d.checkpoint == "s3://pretrain-runs/e3d-mae"

    # run.init_from and evaluation download a remote checkpoint's model/ part for as long as they need it
    import os

    from components.training.loop import local_checkpoint

    with local_checkpoint("s3://pretrain-runs/e3d-mae", s3_server) as local:
        assert os.path.isfile(os.path.join(local, "model", "encoder.safetensors"))
    assert not os.path.exists(local)
    with local_checkpoint(str(folder)) as local:
        assert local.endswith("checkpoint_000001")
    assert os.path.isdir(local)  # a local checkpoint is used where it is, never removed


def test_folder_without_a_checkpoint_names_what_it_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"encoder checkpoint: no checkpoint \(model/ folder or checkpoint_\*\)"):
        _loaded(str(tmp_path))
