import pytest

from rlhf_kit.training.validate import check_model_path, check_path_exists


def test_check_path_exists(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text("{}\n")
    assert check_path_exists(f, "training data") == f
    with pytest.raises(ValueError, match=r"^training data not found: .*nope\.jsonl$"):
        check_path_exists(tmp_path / "nope.jsonl", "training data")


def test_check_model_path(tmp_path):
    good = tmp_path / "model"
    good.mkdir()
    (good / "config.json").write_text('{"model_type": "llama"}')
    (good / "model.safetensors").write_bytes(b"")
    assert check_model_path(good) == str(good)
    assert check_model_path("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        check_model_path(empty)
    with pytest.raises(ValueError, match="does not exist"):
        check_model_path(tmp_path / "missing" / "model")
    with pytest.raises(ValueError, match="does not exist"):
        check_model_path("not a model")
    with pytest.raises(ValueError, match="is a file"):
        check_model_path(good / "config.json")


def test_check_model_path_refuses_directories_that_are_not_models(tmp_path):
    killed = tmp_path / "killed"  # a config.json cut to 0 bytes by a kill mid-write
    killed.mkdir()
    (killed / "config.json").write_text("")
    with pytest.raises(ValueError, match=r"killed/config.json: unreadable model config"):
        check_model_path(killed)
    (killed / "config.json").write_text('{"steps": 3}')
    with pytest.raises(ValueError, match=r"no 'model_type'"):
        check_model_path(killed)
    (killed / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match=r"has no weights"):
        check_model_path(killed)
    for bad in ("./x/y", "/abs/path"):
        with pytest.raises(ValueError):
            check_model_path(bad)


def test_a_model_with_another_tokenizer_of_the_same_size_is_refused(tmp_path, tokenizer):
    import json

    from transformers import AutoTokenizer

    from rlhf_kit.training.validate import check_same_tokenizer, tokenizer_fingerprint

    same, other, bare = tmp_path / "same", tmp_path / "other", tmp_path / "bare"
    tokenizer.save_pretrained(same)
    tokenizer.save_pretrained(other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]  # two ordinary tokens trade ids: same size, other ids
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    swapped = AutoTokenizer.from_pretrained(other)
    assert len(swapped) == len(tokenizer) and tokenizer_fingerprint(swapped) != tokenizer_fingerprint(
        tokenizer
    )
    bare.mkdir()  # no tokenizer files: nothing to compare
    check_same_tokenizer(tokenizer, {"--reward-model": str(same), "--critic": str(bare), "--x": None})
    with pytest.raises(ValueError, match=r"--reward-model .*other: its tokenizer differs from the actor's"):
        check_same_tokenizer(tokenizer, {"--reward-model": str(other)})


def test_the_actors_own_checkpoint_passes_when_its_tokenizer_has_no_pad_token(tmp_path):
    """SmolLM2's case: actor and reward model from one directory whose tokenizer has no pad token. The
    actor's tokenizer pads with EOS once loaded; the pad token decides no token id, so the check passes."""
    from rlhf_kit.data.tokenizer import load_tokenizer
    from rlhf_kit.tiny import save_real_like_checkpoint
    from rlhf_kit.training.validate import check_same_tokenizer

    path = save_real_like_checkpoint(str(tmp_path / "ckpt"), pad="none")
    tok = load_tokenizer(path, padding_side="left")
    assert tok.pad_token == tok.eos_token  # set by load_tokenizer: the directory has none
    check_same_tokenizer(tok, {"--reward-model": path, "--critic": path})
