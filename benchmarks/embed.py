"""Throughput of recipes/embed.py's encoder (frozen Sentence-BERT, scope.profiles.embedding) vs raw
``SentenceTransformer.encode`` on the same profile texts, alternated; median of the repeats.
Target: ratio = users_per_s / raw_users_per_s >= 0.9.

    python benchmarks/embed.py [--users 400 --repeats 3 --batch_size 64]
"""

import argparse
import statistics
import time

import torch

from benchmarks.common import emit, peak_rss_mb


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work_dir", default="/tmp/uscope-embed-bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from scope.profiles.corpus import ProfileDataArguments, build_corpus
    from scope.profiles.embedding import ProfileEncoder
    from scope.profiles.llms import load_embedder

    corpus = build_corpus(ProfileDataArguments(cohort_dir=f"{args.work_dir}/cohort", n_users=args.users, days=2,
                                               teacher_cache_dir=f"{args.work_dir}/cache"))
    texts = [corpus.results[u].profile.to_text() for u in corpus.profiled("train", "val", "test", "cold")]
    sbert = load_embedder()
    encoder = ProfileEncoder(sbert)
    encoder.encode(texts[:8])  # warm-up
    runs = {"ours": [], "raw": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        encoder.encode(texts, batch_size=args.batch_size)
        runs["ours"].append(time.perf_counter() - start)
        start = time.perf_counter()
        sbert.encode(texts, batch_size=args.batch_size, normalize_embeddings=True, show_progress_bar=False)
        runs["raw"].append(time.perf_counter() - start)
    ours, raw = len(texts) / statistics.median(runs["ours"]), len(texts) / statistics.median(runs["raw"])
    return emit("embed", {"users": len(texts), "users_per_s": round(ours, 1), "raw_users_per_s": round(raw, 1),
                          "ratio": round(ours / raw, 3), "batch_size": args.batch_size, "threads": args.threads,
                          "peak_rss_mb": round(peak_rss_mb(), 1)})


if __name__ == "__main__":
    main()
