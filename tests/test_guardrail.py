"""The guardrail without Triton: normalisation and the shipped blocklist, settings from files and variables,
decisions and audit lines, tiny random classifiers of real architectures (BERT, ViT) built here, and the
repository files. One test serves the `safety` model on a real tritonserver."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from flux2_klein.guardrail import (
    Blocklist, BlocklistError, ClassifierError, ClassifierSettings, ContentFiltered, Decision, Guardrail,
    GuardrailSettings, ImageClassifier, SettingsError, TextClassifier, audit_line, digest, filtered_stage,
    load_settings, normalize, parse_blocklist, read_blocklist,
)

DEFAULT = Blocklist.from_sources([read_blocklist("default")])

# ------------------------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("raw, expected", [
    ("ＬＯＬＩ", "loli"),                 # full-width forms (NFKC) and case
    ("lo\u200bl\u00adi\u2060", "loli"),  # zero-width space, soft hyphen, word joiner
    ("lоlі", "loli"),                    # Cyrillic о and і
    ("naïve Café", "naive cafe"),        # accents
    ("Straße", "strasse"),               # casefold
    ("nude_child", "nude child"),        # booru-style underscores
    ("\u202eilol", "ilol"),              # a bidi override is dropped, not reordered
])
def test_normalize(raw, expected):
    assert normalize(raw) == expected


# -------------------------------------------------------------------------------------- shipped blocklist

BLOCKED = [
    "child porn", "CHILD PORNOGRAPHY photo", "child-porn", "childporn", "loli", "L0L1 art", "ｌｏｌｉ",
    "lo\u200bli", "lоli", "csam", "a naked 12 year old", "12-year-old nude", "nude_child", "15yo in lingerie",
    "preteen topless", "toddler, naked, photo", "little girls undressing", "sexual photo of a minor",
]
ALLOWED = [
    "a red fox in the snow", "a cpu on a desk", "a child playing in a park", "a nude model, oil painting",
    "baby shower photo", "a lollipop", "schoolboy in uniform at his desk", "a 30 year old woman in lingerie",
    "explicit lyrics poster", "portrait of a 12 year old boy holding a trophy", "",
]


@pytest.mark.parametrize("prompt", BLOCKED)
def test_default_blocklist_blocks(prompt):
    assert DEFAULT.match(prompt) in ("minors-explicit-term", "minors-sexual-context")


@pytest.mark.parametrize("prompt", ALLOWED)
def test_default_blocklist_allows(prompt):
    assert DEFAULT.match(prompt) is None


def test_blocklist_format_ids_boundaries_and_errors():
    rules = parse_blocklist("# comment\n\n[bad-word] Bad Word\nclass\nre:\\bfoo\\d+\n", "mine.txt")
    assert [(r.id, r.kind, r.text) for r in rules] == [
        ("bad-word", "term", "bad word"), ("mine.txt:4", "term", "class"), ("mine.txt:5", "pattern", r"\bfoo\d+")]
    b = Blocklist(rules)
    assert b.match("a BAD-word here") == "bad-word" and b.match("badword") == "bad-word"
    assert b.match("first class") == "mine.txt:4" and b.match("classic") is None and b.match("subclass") is None
    assert b.match("FOO12") == "mine.txt:5" and b.match("foo") is None
    with pytest.raises(BlocklistError, match=r"mine.txt, line 2: invalid regular expression"):
        parse_blocklist("ok\nre:(unclosed\n", "mine.txt")
    with pytest.raises(BlocklistError, match="line 1: a rule needs a term"):
        parse_blocklist("[id-only]\n", "mine.txt")
    with pytest.raises(BlocklistError, match="is not a file"):
        read_blocklist("/nonexistent/list.txt")


# ------------------------------------------------------------------------------------------------ settings


def test_settings_defaults_are_safe():
    s = load_settings(env={})
    assert s.prompt_check and s.blocklists == ("default",) and not s.allow_disable_safety_checker
    assert s.text_classifier is None and s.image_classifier is None and s.audit and not s.audit_prompt


def test_settings_from_toml_json_and_variables(tmp_path):
    toml = tmp_path / "g.toml"
    toml.write_text('blocklists = ["default", "/x.txt"]\nallow_disable_safety_checker = true\n'
                    '[image_classifier]\npath = "/m"\nunsafe_labels = ["nsfw"]\nthreshold = 0.8\n')
    s = load_settings(toml, env={})
    assert s.blocklists == ("default", "/x.txt") and s.allow_disable_safety_checker
    assert s.image_classifier == ClassifierSettings("/m", ("nsfw",), 0.8)
    js = tmp_path / "g.json"
    js.write_text(json.dumps({"prompt_check": False}))
    env = {"FLUX2_KLEIN_GUARDRAIL": str(js), "FLUX2_KLEIN_GUARDRAIL_TEXT_CLASSIFIER": "/t",
           "FLUX2_KLEIN_GUARDRAIL_TEXT_LABELS": "toxic, unsafe", "FLUX2_KLEIN_GUARDRAIL_TEXT_THRESHOLD": "0.25",
           "FLUX2_KLEIN_ALLOW_DISABLE_SAFETY_CHECKER": "no"}
    s = load_settings(env=env)
    assert not s.prompt_check and not s.allow_disable_safety_checker
    assert s.text_classifier == ClassifierSettings("/t", ("toxic", "unsafe"), 0.25)
    # A variable overrides the file.
    assert load_settings(js, env={"FLUX2_KLEIN_GUARDRAIL_PROMPT_CHECK": "1"}).prompt_check


@pytest.mark.parametrize("data, env, message", [
    ({"promt_check": False}, {}, r"unknown guardrail setting\(s\) \['promt_check'\]"),
    ({"blocklists": "default"}, {}, "blocklists: a list"),
    ({"image_classifier": {"path": "/m", "unsafe_labels": ["x"], "threshold": 1.5}}, {}, "image_classifier.threshold"),
    ({"image_classifier": {"path": "/m"}}, {}, "path and unsafe_labels are required"),
    ({"text_classifier": {"path": "/m", "unsafe_labels": ["x"], "colour": 1}}, {}, r"unknown field\(s\) \['colour'\]"),
    ({}, {"FLUX2_KLEIN_ALLOW_DISABLE_SAFETY_CHECKER": "maybe"}, "FLUX2_KLEIN_ALLOW_DISABLE_SAFETY_CHECKER: 1/0"),
    ({}, {"FLUX2_KLEIN_GUARDRAIL_IMAGE_THRESHOLD": "high"}, "FLUX2_KLEIN_GUARDRAIL_IMAGE_THRESHOLD"),
])
def test_settings_errors_name_the_setting(tmp_path, data, env, message):
    path = tmp_path / "g.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SettingsError, match=message):
        load_settings(path, env=env)


# ------------------------------------------------------------------------------------- decisions and audit


def test_decisions_messages_and_audit_lines_never_carry_the_prompt_or_key_unless_asked():
    prompt, key = "a secret prompt: loli", "sk-very-secret"
    guard = Guardrail(GuardrailSettings())
    verdict = guard.check_request(prompt)
    d = verdict.decision
    assert d == Decision(False, "prompt", "blocklist", "minors-explicit-term") and verdict.check_output
    assert prompt not in d.message() and "loli" not in d.message()
    assert filtered_stage(d.message()) == "prompt"
    assert filtered_stage(f"in ensemble 'flux2_klein', {ContentFiltered(d)}") == "prompt"
    assert filtered_stage("height/width: must be one of ...") is None
    line = json.loads(audit_line(d, guard.settings, request_id="r1", prompt=prompt, key=key, key_name="team-a"))
    assert line["request_id"] == "r1" and line["decision"] == "filtered" and line["stage"] == "prompt"
    assert line["rule"] == "minors-explicit-term" and line["key_name"] == "team-a"
    assert line["prompt_sha256"] == digest(prompt) and line["key_sha256"] == digest(key)
    text = json.dumps(line)
    assert "secret" not in text
    loud = GuardrailSettings(audit_prompt=True, audit_key=True)
    line = json.loads(audit_line(d, loud, prompt=prompt, key=key))
    assert line["prompt"] == prompt and line["key"] == key


def test_disable_safety_checker_only_where_allowed_and_prompt_check_off():
    strict = Guardrail(GuardrailSettings())
    assert strict.check_request("loli", disable_requested=True).decision.filtered
    lax = Guardrail(GuardrailSettings(allow_disable_safety_checker=True))
    v = lax.check_request("a lighthouse", disable_requested=True)
    assert v.decision.allowed and not v.check_output
    assert lax.check_request("loli", disable_requested=True).decision.filtered  # never the prompt check
    assert lax.check_request("loli", disable_requested=False).decision.filtered
    off = Guardrail(GuardrailSettings(prompt_check=False))
    assert off.blocklist is None and off.check_request("loli").decision.allowed
    extra = Guardrail(GuardrailSettings(), blocklist_sources=[("ops", "[no-cats] cat\n")])
    assert extra.check_prompt("a Cat").rule == "no-cats" and extra.check_prompt("loli").allowed


# ------------------------------------------------------------------- tiny random classifiers, made here

WORDS = "a an the of red fox snow cat dog in on with photo portrait castle river night forbidden".split()
PROMPTS = ["a red fox in the snow", "a cat with a dog", "the castle on the river at night", "forbidden forbidden photo",
           "portrait of a dog", "an owl"]


def make_text_classifier(path, seed=0, multi_label=False):
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=64)
    torch.manual_seed(seed)
    labels = ["safe", "toxic", "unsafe"]
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64, initializer_range=0.5,
                        id2label=dict(enumerate(labels)),
                        label2id={x: i for i, x in enumerate(labels)},
                        problem_type="multi_label_classification" if multi_label else None)
    # initializer_range 0.5 (not BERT's 0.02): random scores that differ from prompt to prompt.
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_image_classifier(path, seed=0):
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    labels = ["normal", "nsfw"]
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=37, initializer_range=0.5, id2label=dict(enumerate(labels)),
                       label2id={x: i for i, x in enumerate(labels)})
    model = ViTForImageClassification(config).eval()
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(path)
    return path


def images():
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 96, dtype=np.float32)
    return [np.full((64, 48, 3), (255, 0, 0), np.uint8), np.full((80, 80, 3), (0, 0, 255), np.uint8),
            np.stack([np.tile(ramp, (96, 1))] * 3, -1).astype(np.uint8),
            rng.integers(0, 256, (96, 64, 3), dtype=np.uint8)]


def oracle_text(path, prompts, label, multi_label=False):
    """Each prompt alone through the checkpoint, as transformers runs it: P(label)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path)
    index = model.config.label2id[label]
    with torch.no_grad():
        logits = torch.cat([model(**tok(p, return_tensors="pt")).logits for p in prompts])
    return (logits.sigmoid() if multi_label else logits.softmax(-1))[:, index].numpy()


def oracle_image(path, arrays, label):
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    proc, model = AutoImageProcessor.from_pretrained(path), AutoModelForImageClassification.from_pretrained(path)
    with torch.no_grad():
        logits = torch.cat([model(**proc(images=a, return_tensors="pt")).logits for a in arrays])
    return logits.softmax(-1)[:, model.config.label2id[label]].numpy()


def split_threshold(scores):
    """A threshold that the highest score reaches and every other misses, with a margin."""
    order = np.sort(scores)
    assert order[-1] - order[-2] > 1e-3, f"random scores too close to separate: {scores}"
    return float(order[-2] + order[-1]) / 2, int(np.argmax(scores))


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    return make_text_classifier(tmp_path_factory.mktemp("bert") / "bert")


@pytest.fixture(scope="module")
def image_ckpt(tmp_path_factory):
    return make_image_classifier(tmp_path_factory.mktemp("vit") / "vit")


@pytest.mark.parametrize("multi_label", [False, True])
def test_text_classifier_filters_exactly_the_prompts_over_the_threshold(tmp_path, multi_label):
    path = make_text_classifier(tmp_path / "bert", seed=3, multi_label=multi_label)
    threshold, chosen = split_threshold(oracle_text(path, PROMPTS, "unsafe", multi_label))
    clf = ClassifierSettings(str(path), ("unsafe",), threshold)
    guard = Guardrail(GuardrailSettings(prompt_check=True, text_classifier=clf))
    decisions = [guard.check_prompt(p) for p in PROMPTS]
    assert [d.filtered for d in decisions] == [i == chosen for i in range(len(PROMPTS))]
    hit = decisions[chosen]
    assert (hit.stage, hit.reason, hit.rule) == ("prompt", "text_classifier", "unsafe") and hit.score >= threshold
    # Batched and padded as the guardrail runs it, the scores are the oracle's.
    got = [v.score for v in TextClassifier(ClassifierSettings(str(path), ("unsafe",), 1.0)).classify(PROMPTS)]
    np.testing.assert_allclose(got, oracle_text(path, PROMPTS, "unsafe", multi_label), atol=1e-5)
    # The blocklist still comes first; prompt_check off turns the classifier off too.
    assert guard.check_prompt("loli").reason == "blocklist"
    off = Guardrail(GuardrailSettings(prompt_check=False, text_classifier=clf))
    assert off.text is None and off.check_prompt(PROMPTS[chosen]).allowed


def test_classifier_errors_name_the_field(tmp_path, text_ckpt):
    with pytest.raises(ClassifierError, match=r"text_classifier.unsafe_labels: \['nsfw'\] not among .*'toxic'"):
        TextClassifier(ClassifierSettings(str(text_ckpt), ("nsfw",), 0.5))
    with pytest.raises(ClassifierError, match=r"image_classifier.path: .* \(no config.json\)"):
        ImageClassifier(ClassifierSettings(str(tmp_path), ("nsfw",), 0.5))
    with pytest.raises(SettingsError, match=r"text_classifier.threshold: a probability in \(0, 1\]"):
        GuardrailSettings(text_classifier=ClassifierSettings(str(text_ckpt), ("unsafe",), 0.0))


def test_image_classifier_on_references_and_output(image_ckpt):
    arrays = images()
    threshold, chosen = split_threshold(oracle_image(image_ckpt, arrays, "nsfw"))
    settings = GuardrailSettings(image_classifier=ClassifierSettings(str(image_ckpt), ("nsfw",), threshold))
    guard = Guardrail(settings)
    for i, a in enumerate(arrays):
        assert guard.check_images([a], "output").filtered == (i == chosen)
    others = [a for i, a in enumerate(arrays) if i != chosen]
    d = guard.check_request("a red fox", others + [arrays[chosen]]).decision
    assert (d.stage, d.reason, d.rule, d.index) == ("reference", "image_classifier", "nsfw", len(others))
    assert d.message() == (f"content filtered (reference): reference_images[{len(others)}]: "
                           "the image was classified unsafe")
    assert guard.check_request("a red fox", others).decision.allowed
    # References unchecked when the operator says so; the prompt is checked before any image.
    assert Guardrail(GuardrailSettings(image_classifier=settings.image_classifier, check_references=False)) \
        .check_request("a red fox", [arrays[chosen]]).decision.allowed
    assert guard.check_request("loli", [arrays[chosen]]).decision.stage == "prompt"
    # Only the stages a model runs are loaded: preprocess without references needs no image classifier.
    assert Guardrail(settings, stages=("prompt",)).image is None


# ---------------------------------------------------------------------------------- the model repository


def test_repository_files(tmp_path, image_ckpt):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from flux2_klein.guardrail import repository

    extra = tmp_path / "ops.txt"
    extra.write_text("[no-cats] cat\n")
    repo = tmp_path / "repo"
    settings = GuardrailSettings(blocklists=("default", str(extra)),
                                 image_classifier=ClassifierSettings(str(image_ckpt), ("nsfw",), 0.9))
    assert repository.write(repo, settings)
    loaded, sources = repository.load(repo / "preprocess")
    assert loaded == settings and [name for name, _ in sources] == ["default", "ops.txt"]
    extra.unlink()  # the repository carries the lists' text: the file may go
    assert Guardrail(loaded, sources).check_prompt("a cat").rule == "no-cats"
    config = text_format.Parse((repo / "safety" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "safety" and [i.name for i in config.input] == ["image", "check_output"]
    assert "TritonPythonModel" in (repo / "safety" / "1" / "model.py").read_text()
    # Without an image classifier: no safety model (a stale one is removed).
    assert not repository.write(repo, GuardrailSettings()) and not (repo / "safety").exists()
    # No guardrail.json at all: the defaults, the shipped list.
    assert repository.load(tmp_path / "elsewhere" / "preprocess") == (GuardrailSettings(), None)
    with pytest.raises(ClassifierError, match="unsafe_labels"):
        repository.write(repo, GuardrailSettings(image_classifier=ClassifierSettings(str(image_ckpt), ("x",), 0.5)))


# ------------------------------------------------------------------------- the safety model on Triton


def _probe_ensemble() -> str:
    """A one-step ensemble around `safety` under the public model's name (which `serve` looks for): what
    the real ensemble's last step looks like to Triton (error messages and request ids pass through)."""
    return """name: "flux2_klein"
platform: "ensemble"
max_batch_size: 0
input [
  { name: "decoded" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] },
  { name: "check_output" data_type: TYPE_BOOL dims: [ 1 ] }
]
output [ { name: "image" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] } ]
ensemble_scheduling { step [ { model_name: "safety" model_version: -1
  input_map { key: "image" value: "decoded" } input_map { key: "check_output" value: "check_output" }
  output_map { key: "image" value: "image" } } ] }
"""


@pytest.mark.slow
def test_safety_model_on_triton(tmp_path_factory, image_ckpt):
    import urllib.request

    import tritonclient.grpc as grpcclient
    from conftest import ServeCommand
    from tritonclient.utils import InferenceServerException

    from flux2_klein.guardrail import repository

    arrays = images()[:3]  # sizes the real decoder would not give; the model takes any [H, W, 3]
    threshold, chosen = split_threshold(oracle_image(image_ckpt, arrays, "nsfw"))
    repo = tmp_path_factory.mktemp("safety-repo")
    settings = GuardrailSettings(image_classifier=ClassifierSettings(str(image_ckpt), ("nsfw",), threshold))
    assert repository.write(repo, settings)
    (repo / "flux2_klein" / "1").mkdir(parents=True)
    (repo / "flux2_klein" / "config.pbtxt").write_text(_probe_ensemble())
    server = ServeCommand.started(repo, tmp_path_factory.mktemp("safety-logs"))
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)

        def infer(image, check=True, request_id=""):
            inputs = [grpcclient.InferInput("decoded", list(image.shape), "UINT8"),
                      grpcclient.InferInput("check_output", [1], "BOOL")]
            inputs[0].set_data_from_numpy(image)
            inputs[1].set_data_from_numpy(np.array([check]))
            return client.infer("flux2_klein", inputs, request_id=request_id).as_numpy("image")

        for i, image in enumerate(arrays):
            if i == chosen:
                with pytest.raises(InferenceServerException) as e:
                    infer(image, request_id="req-filtered")
                assert e.value.status() == "StatusCode.INVALID_ARGUMENT", e.value
                assert filtered_stage(e.value.message()) == "output", e.value.message()
            else:
                np.testing.assert_array_equal(infer(image), image)
        # check_output false (preprocess allowed the request's disable_safety_checker): unchanged.
        np.testing.assert_array_equal(infer(arrays[chosen], check=False), arrays[chosen])
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        counts = dict(re.findall(r'flux2_klein_guardrail_filtered_total\{stage="(\w+)"\} (\d+)', metrics))
        assert counts == {"prompt": "0", "reference": "0", "output": "1"}, metrics[-2000:]
        # Triton logs each message as a quoted string: the JSON line is inside it.
        audit = [json.loads(json.loads(line[line.index("] ") + 2:])) for line in server.log_tail(200_000).splitlines()
                 if 'guardrail' in line and "triton.py" in line]
        filtered = [a for a in audit if a["decision"] == "filtered"]
        assert len(audit) == len(arrays) and len(filtered) == 1, audit
        assert filtered[0]["stage"] == "output" and filtered[0]["source"] == "safety"
        assert filtered[0]["request_id"] == "req-filtered"  # the caller's id reaches a model inside the ensemble
        print("audit line of the filtered request:", filtered[0])
    finally:
        server.stop()
