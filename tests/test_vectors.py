import numpy as np
import pytest

from memory.schema import MemoryCandidate
from memory.vector_db import EncoderMismatchError, MemoryVectorDB
from memory.vectors import ChatModelVectorizer, SentenceEncoderVectorizer


def test_minilm_encoder_gives_unit_vectors_that_rank_paraphrases_first():
    enc = SentenceEncoderVectorizer("minilm")
    vecs = enc.encode(["The user has a dog called Max.", "What is my dog's name?", "The user lives in Porto."])
    assert vecs.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert vecs[1] @ vecs[0] > vecs[1] @ vecs[2]
    assert enc.encoder_id.startswith("encoder:all-MiniLM-L6-v2")


def test_db_refuses_to_mix_encoders(tmp_path, tiny_model, tokenizer):
    chat = ChatModelVectorizer(tiny_model, tokenizer, "tiny", template="prompteol")
    minilm = SentenceEncoderVectorizer("minilm")
    cand = [MemoryCandidate(text="The user lives in Porto.", user_id="u")]
    with MemoryVectorDB(tmp_path / "db") as db:
        db.add(cand, chat.encode([cand[0].text]), chat.encoder_id)
        with pytest.raises(EncoderMismatchError):
            db.add(cand, minilm.encode([cand[0].text]), minilm.encoder_id)


def test_unknown_template_and_missing_encoder_are_clear_errors(tiny_model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="embedding_template"):
        ChatModelVectorizer(tiny_model, tokenizer, "tiny", template="fancy")
    with pytest.raises(FileNotFoundError, match="encoder directory"):
        SentenceEncoderVectorizer(str(tmp_path / "none"))
