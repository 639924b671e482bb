"""User profile encodings (the frozen half of Eq. 24): profile -> frozen Sentence-BERT, stored per user.

The MLP of Eq. 24 that turns them into h_u is trained with the completion engine (recipes/complete.py).

    python recipes/embed.py                               # CPU default: recipes/configs/embed.yaml

Profiles come from the teacher (default: the grounded teacher, cached) or, with ``student``, from
a distilled student answering every prompt (users whose answer is invalid fall back to the
teacher's profile and are counted). Output format: see scope/profiles/embedding.py.
"""

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scope.cli import parse_config, run_recipe
from scope.profiles.corpus import ProfileDataArguments, build_corpus
from scope.profiles.embedding import ProfileEncoder, write_user_embeddings
from scope.profiles.llms import EMBEDDER, load_embedder
from scope.profiles.schema import ProfileError, parse_profile

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "embed.yaml"
log = logging.getLogger("recipes.embed")


@dataclass
class EmbedArguments(ProfileDataArguments):
    output_dir: str = "runs/uscope/embeddings"
    encoder: str = EMBEDDER
    pooling: str = "mean"                 # mean (the encoder's own) | cls (the first token, the paper's [CLS])
    batch_size: int = 64
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test", "cold"])
    student_base: str = ""                # e.g. smollm2-135m-instruct: profile users with the student instead
    student_adapters: list[str] = field(default_factory=list)
    student_max_new_tokens: int = 512
    device: str = "cpu"


def profile_texts(args: EmbedArguments, corpus, users: list[int]) -> tuple[list[str], list[str], int]:
    """Profile text + JSON per user; from the student if configured (fallback: teacher)."""
    profiles = {u: corpus.results[u].profile for u in users}
    fallbacks = 0
    if args.student_base:
        from scope.profiles.evaluation import generate_answers
        from scope.profiles.llms import load_student, load_tokenizer
        from scope.profiles.sft import set_stop_token

        tokenizer = load_tokenizer(args.student_base)
        model = load_student(args.student_base, args.student_adapters)
        set_stop_token(model, tokenizer)
        answers = generate_answers(model, tokenizer, [corpus.prompts[u] for u in users],
                                   max_new_tokens=args.student_max_new_tokens)
        for u, answer in zip(users, answers):
            try:
                profiles[u] = parse_profile(answer)
            except ProfileError as err:
                fallbacks += 1
                log.warning("user %d: student answer invalid (%s): using the teacher's profile", u, err)
    return [profiles[u].to_text() for u in users], [profiles[u].to_json() for u in users], fallbacks


def main(args: EmbedArguments) -> dict:
    start = time.perf_counter()
    corpus = build_corpus(args, report_dir=args.output_dir)
    users = corpus.profiled(*args.splits)
    if not users:
        raise ValueError(f"no profiled users in splits {args.splits}")
    texts, jsons, fallbacks = profile_texts(args, corpus, users)
    encoder = ProfileEncoder(load_embedder(args.encoder, args.device), args.pooling)
    t = time.perf_counter()
    features = encoder.encode(texts, batch_size=args.batch_size)
    encode_s = time.perf_counter() - t
    path = write_user_embeddings(args.output_dir, users, texts, jsons, [corpus.split_of[u] for u in users], features,
                                 args.encoder, args.pooling)
    summary = {"users": len(users), "dim": int(features.shape[1]), "pooling": args.pooling,
               "student_fallbacks": fallbacks, "encode_users_per_s": len(users) / max(encode_s, 1e-9),
               "wall_s": time.perf_counter() - start, "path": str(path), "finite": bool(np.isfinite(features).all())}
    print(f"wrote the profile encodings [{len(users)} x {features.shape[1]}] to {path}")
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.exit(run_recipe(main, *parse_config((EmbedArguments,), default_config=DEFAULT_CONFIG)))
