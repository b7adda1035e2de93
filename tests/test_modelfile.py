"""Modelfile TEMPLATE round-trip proof: the model's HF Jinja template, the family's Go TEMPLATE executed by Go's
text/template (ftx-gotmpl) and llama.cpp's own template handling (llama-server /apply-template) must give the
same token ids. Golden tests use the real chat templates of real models (vendored with llama.cpp under
models/templates), served by llama-server on the SmolLM2 GGUF with --chat-template-file."""

import shutil

import pytest

from ftx.core import basemodel, llamacpp
from ftx.packaging import modelfile as mf

from .conftest import ROOT

pytestmark = pytest.mark.e2e

# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template (Llama-3.0; not among llama.cpp's files)
LLAMA3_0 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

GOLDEN = [  # (family, template file under llama.cpp's models/templates or inline text)
    ("chatml", "Qwen-Qwen2.5-7B-Instruct.jinja"),
    ("llama3", LLAMA3_0),
    ("mistral", "mistralai-Mistral-Nemo-Instruct-2407.jinja"),
    ("gemma", "google-gemma-2-2b-it.jinja"),
    ("phi3", "microsoft-Phi-3.5-mini-instruct.jinja"),
]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(basemodel.resolve("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """The packaged SmolLM2 GGUF, and a copy whose vocabulary adds BOS (as Llama/Mistral/Gemma vocabularies
    do; their HF templates write bos_token themselves)."""
    import gguf

    plain = basemodel.packaged_gguf("smollm2-135m-instruct")
    bos = tmp_path_factory.mktemp("gguf") / "smollm2-add-bos.gguf"
    shutil.copy(plain, bos)
    reader = gguf.GGUFReader(bos, "r+")
    field = reader.fields["tokenizer.ggml.add_bos_token"]
    field.parts[field.data[0]][0] = True
    del reader
    return {"plain": plain, "bos": bos}


def _template(source: str, tmp_path):
    path = tmp_path / "chat_template.jinja"
    text = (
        source if "{%" in source else (llamacpp.home() / "src/vendor/llama.cpp/models/templates" / source).read_text()
    )
    path.write_text(text)
    return path


def _prove(tok, ggufs, template_path, tmp_path):
    text = template_path.read_text()
    gguf = ggufs["bos"] if "bos_token" in text or "<|begin_of_text|>" in text else ggufs["plain"]
    return mf.prove_with_server(tok, gguf, tmp_path / "server.log", template_path)


@pytest.mark.parametrize("family,source", GOLDEN, ids=[f for f, _ in GOLDEN])
def test_golden_family_is_proven(tok, ggufs, tmp_path, family, source):
    proof = _prove(tok, ggufs, _template(source, tmp_path), tmp_path)
    assert proof.proven, proof.reason
    assert proof.family == family
    same = [r for r in proof.rows if r.status == "same"]
    assert len(same) >= 3 and all(r.tokens > 5 for r in same)
    skipped = [r.conversation for r in proof.rows if r.status == "skipped"]
    assert skipped == (["system + single turn", "system + multi-turn"] if family == "gemma" else [])
    if family == "chatml":  # Qwen2.5 injects its own system prompt; the proof found it and Ollama will send it
        assert proof.system.startswith("You are Qwen, created by Alibaba Cloud")


def test_llama31_date_header_is_caught(tok, ggufs, tmp_path):
    """Llama-3.1's template prints 'Today Date: 26 Jul 2024' unless told the date; llama.cpp passes today's date.
    The Go TEMPLATE reproduces the HF rendering, but the three renderers do not agree: no Modelfile."""
    proof = _prove(tok, ggufs, _template("meta-llama-Llama-3.1-8B-Instruct.jinja", tmp_path), tmp_path)
    assert not proof.proven
    assert proof.family == "llama3.1"  # the Go leg holds
    from datetime import datetime

    # where the token ids first differ: the template's fixed date against llama.cpp's today (UTC on this machine)
    assert "llama.cpp renders" in proof.reason and "26 Jul" in proof.reason
    assert datetime.now().strftime("%b") in proof.reason


def test_unknown_or_subtly_wrong_template_is_not_guessed(tok, ggufs, tmp_path):
    alpaca = (
        "{% for m in messages %}{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
        "{% elif m['role'] == 'assistant' %}### Response:\n{{ m['content'] }}\n\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}### Response:\n{% endif %}"
    )
    proof = _prove(tok, ggufs, _template(alpaca, tmp_path), tmp_path)
    assert not proof.proven and proof.family is None
    assert "no Go template family" in proof.reason and set(proof.tried) == set(mf.FAMILIES)
    # ChatML with one newline missing after the role: close, but not ChatML
    almost = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    proof = _prove(tok, ggufs, _template(almost, tmp_path), tmp_path)
    assert not proof.proven and "chatml" in proof.tried


def test_modelfile_for_smollm2_from_its_gguf(tok, ggufs, tmp_path):
    """The real path: template and vocabulary from the GGUF itself, Modelfile values from the tokenizer."""
    base = basemodel.resolve("smollm2-135m-instruct")
    gguf = tmp_path / "model.gguf"
    shutil.copy(ggufs["plain"], gguf)
    proof = mf.write(tok, base, gguf, "smol", 1024, tmp_path / "Modelfile")
    assert proof.proven and proof.family == "chatml", proof.reason
    assert all(r.status == "same" for r in proof.rows) and len(proof.rows) == len(mf.PROBES)
    text = (tmp_path / "Modelfile").read_text()
    assert "FROM ./model.gguf" in text and "PARAMETER num_ctx 1024" in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    stops = [line.split('"')[1] for line in text.splitlines() if line.startswith("PARAMETER stop")]
    assert stops[0] == tok.eos_token == "<|im_end|>" and "<|im_start|>" in stops
    # an end token the export's termination check added (export.termination.other_end_token: extend) joins them
    assert mf.stop_tokens(tok, base, "chatml", ["<|endoftext|>"]) == [*stops, "<|endoftext|>"]
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template == (ROOT / "modelfiles" / "chatml.gotmpl").read_text()
    assert (tmp_path / "Modelfile.proof.json").is_file()
    # the variant without TEMPLATE and SYSTEM: the GGUF embeds SmolLM2's template, which llama.cpp renders to the
    # HF ids (its default system prompt included, the "single turn" conversation has none)
    assert proof.gguf_template and proof.llamacpp_same
    variant = (tmp_path / "Modelfile.gguf-template").read_text()
    assert "TEMPLATE" not in variant.replace("No TEMPLATE", "") and "SYSTEM" not in variant
    assert [line for line in variant.splitlines() if not line.startswith("#")] == [
        line for line in text.splitlines() if not line.startswith("#") and line.startswith(("FROM", "PARAMETER"))
    ]


def test_gguf_template_that_differs_from_the_tokenizers_is_caught(tok, ggufs, tmp_path):
    """A tokenizer whose chat template is not the one the GGUF embeds (here ChatML without the newline after the
    role; the GGUF keeps SmolLM2's): neither a Go family nor the GGUF's own template gives its ids, so neither
    Modelfile is written, and a stale variant from an earlier run goes."""
    import copy

    other = copy.deepcopy(tok)
    other.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    gguf = tmp_path / "model.gguf"
    shutil.copy(ggufs["plain"], gguf)
    (tmp_path / "Modelfile.gguf-template").write_text("stale")
    proof = mf.write(other, None, gguf, "smol", 1024, tmp_path / "Modelfile")
    assert not proof.proven and proof.gguf_template is False and not proof.llamacpp_same
    assert "llama.cpp renders the GGUF's template differently" in proof.reason
    assert not (tmp_path / "Modelfile").exists() and not (tmp_path / "Modelfile.gguf-template").exists()


def test_go_renderer_has_ollama_semantics():
    """ftx-gotmpl is Go's text/template with Ollama's data: consecutive same-role messages merged with a blank
        line, .System = all system messages; a key Ollama does not set prints "<no value>" there too (missingkey=zero
    on an interface map), which is why the family templates use only System, Messages, Role and Content."""
    t = (
        "{{ .System }}|{{ range $i, $m := .Messages }}{{ $i }}:{{ .Role }}={{ .Content }};{{ end }}"
        "{{ .Response }}{{ .Nope }}|{{ len (slice .Messages 1) }}"
    )
    out = mf.go_render(
        t,
        [
            [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
            ]
        ],
    )
    assert out == ["S|0:system=S;1:user=a\n\nb;2:assistant=c;<no value>|2"]
    with pytest.raises(Exception, match="Go template"):
        mf.go_render("{{ range .Messages }}", [[]])
