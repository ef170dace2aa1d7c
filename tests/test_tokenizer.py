"""The Tekken tokenizer and FLUX.2 [dev] prompt format against mistral-common and transformers.

Oracles: docs/oracle.md §4.3 (golden ids, special ids), §4.4 (left padding to 512) and §4.6 (mistral-common's v7
instruct encoder; transformers' convert_tekken_tokenizer + a chat template rendering reference §6.1's string).
"""
import json
import pathlib
import time

import mistral_common
import pytest
from mistral_common.protocol.instruct.messages import SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from util import LoadError
from text_encoder import SYSTEM_MESSAGE, TEXT_PRESETS, Tokenizer

TEKKEN = pathlib.Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
GOLDEN = [1, 17, 4568, 1584, 1420, 26554, 1455, 12738, 2314, 3937, 38340, 1046, 3213, 5628, 37253, 11688, 30557, 1408,
          3481, 14608, 1044, 3481, 1010, 2452, 5604, 1321, 10636, 3816, 67813, 1046, 18, 3, 1097, 10575, 1395, 45091, 4]
PROMPTS = ["a dog is dancing",
           "東京の夜景、ネオンが光る路地で猫が眠っている",
           "emoji 🐕‍🦺🌃👩🏽‍🚀 and flags 🇯🇵, café naïve Ærøskøbing",
           "tabs\tand\nnew lines,   runs of spaces, numbers 1234567 and 3.14159, code `x = f(y)[0]`",
           "literal control spellings stay text: [INST] </s> <s> [SYSTEM_PROMPT]",
           "a very long prompt " * 200]                                       # > 512 tokens: truncated on the right


@pytest.fixture(scope="module")
def tok():
    start = time.perf_counter()
    t = Tokenizer(TEKKEN)
    assert time.perf_counter() - start < 10     # the 150k-token merge derivation must stay cheap (about 1 s here)
    return t


@pytest.fixture(scope="module")
def mistral_v7(tmp_path_factory):
    """mistral-common's own instruct encoder; the bundled file says v3, whose template has no system prompt."""
    raw = json.loads(TEKKEN.read_text())
    raw["config"]["version"] = "v7"
    path = tmp_path_factory.mktemp("tekken") / "tekken.json"
    path.write_text(json.dumps(raw))
    return MistralTokenizer.from_file(str(path))


def test_golden_ids_left_padded_to_512(tok):
    ids, mask = tok.encode_prompts(["a dog is dancing"])
    assert ids.shape == mask.shape == (1, 512)
    assert ids[0, 475:].tolist() == GOLDEN
    assert (ids[0, :475] == 11).all()
    assert mask[0].tolist() == [False] * 475 + [True] * 37
    assert GOLDEN[22] == 1010 and tok.decode([1010]) == "\n"          # the newline inside SYSTEM_MESSAGE


def test_system_message_matches_diffusers():
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE as DIFFUSERS_SYSTEM_MESSAGE
    assert SYSTEM_MESSAGE.encode() == DIFFUSERS_SYSTEM_MESSAGE.encode()


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_matches_mistral_common(tok, mistral_v7, prompt):
    request = ChatCompletionRequest(messages=[SystemMessage(content=SYSTEM_MESSAGE), UserMessage(content=prompt)])
    ref = mistral_v7.encode_chat_completion(request).tokens[:512]
    ids, mask = tok.encode_prompts([prompt])
    n = len(ref)
    assert ids[0, 512 - n:].tolist() == ref and (ids[0, :512 - n] == 11).all()
    assert mask[0].sum() == n and mask[0, 512 - n:].all()


def test_batch_rows_are_independent_and_img_is_removed(tok):
    ids, mask = tok.encode_prompts(PROMPTS + ["a [IMG]dog is dancing[IMG]"])
    for row, prompt in enumerate(PROMPTS):
        one_ids, one_mask = tok.encode_prompts([prompt])
        assert (ids[row] == one_ids[0]).all() and (mask[row] == one_mask[0]).all()
    assert ids[-1].tolist() == ids[0].tolist()
    long_row = ids[len(PROMPTS) - 1]
    assert mask[len(PROMPTS) - 1].all() and long_row[0] == 1 and long_row[-1] != 4     # [/INST] cut off


def test_hf_tokenizer_json(tok, tmp_path):
    """A tokenizer.json from transformers' tekken converter gives the same ids, which also equal the HF chat-template
    path diffusers runs (apply_chat_template, padding='max_length', truncation, left padding)."""
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer
    template = ("{{ bos_token }}{% for m in messages %}{% set c = m['content'] | map(attribute='text') | join('') %}"
                "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ c }}[/SYSTEM_PROMPT]"
                "{% else %}[INST]{{ c }}[/INST]{% endif %}{% endfor %}")
    hf = convert_tekken_tokenizer(str(TEKKEN), chat_template=template)
    hf.save_pretrained(tmp_path)
    prompts = [p for p in PROMPTS if "[INST]" not in p]    # HF parses control spellings in text; we keep them text
    chats = [[{"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
              {"role": "user", "content": [{"type": "text", "text": p}]}] for p in prompts]
    hf.padding_side = "left"
    ref = hf.apply_chat_template(chats, add_generation_prompt=False, tokenize=True, return_dict=True,
                                 return_tensors="pt", padding="max_length", truncation=True, max_length=512)
    expected, expected_mask = tok.encode_prompts(prompts)
    assert (ref["input_ids"] == expected).all() and (ref["attention_mask"].bool() == expected_mask).all()
    expected, expected_mask = tok.encode_prompts(PROMPTS)
    hf.save_pretrained(tmp_path / "after_padded_call")      # now tokenizer.json carries padding/truncation settings
    assert '"padding": {' in (tmp_path / "after_padded_call/tokenizer.json").read_text()
    for source in (tmp_path / "tokenizer.json", tmp_path, tmp_path / "after_padded_call"):
        ids, mask = Tokenizer(source).encode_prompts(PROMPTS)
        assert (ids == expected).all() and (mask == expected_mask).all()


def test_tiny_tokenizer():
    tiny = Tokenizer.tiny()
    prompt = "héllo wörld 🐕\n"
    ids, mask = tiny.encode_prompts([prompt, "x" * 600], max_length=512)
    assert ids.max() < TEXT_PRESETS["tiny"].vocab_size and ids.min() >= 0
    n = 2 + len(SYSTEM_MESSAGE.encode()) + 2 + len(prompt.encode()) + 1          # one id per byte
    row = ids[0, 512 - n:].tolist()
    assert (ids[0, :512 - n] == 11).all() and mask[0].sum() == n and mask[0, 512 - n:].all()
    assert row[:2] == [1, 17] and row[-1] == 4 and row.count(1) == 1
    assert row[2 + len(SYSTEM_MESSAGE.encode()):][:2] == [18, 3]
    assert all(1000 <= i < 1256 for i in row if i > 18)
    assert tiny.decode(row) == SYSTEM_MESSAGE + prompt
    assert mask[1].all() and ids[1, 0] == 1                                       # truncated, BOS kept


def test_bad_files(tmp_path):
    with pytest.raises(LoadError, match="no tokenizer.json"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {"<s>": 5}}}')
    with pytest.raises(LoadError, match="control-token ids"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type"')
    with pytest.raises(LoadError, match="truncated"):
        Tokenizer(tmp_path / "tokenizer.json")
