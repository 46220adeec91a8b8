"""How well a model predicts answers after the fallback prompt format, in format 1 vs format 2.

Format 1 (seamlm before 2026-11-27) ended the prompt in "Answer: " and encoded the answer alone, so a byte-level BPE
tokenizer saw a lone space token and then the answer's first word in its start-of-text form; format 2 ends the
prompt at "Answer:" and joins the answer as the tokenizer encodes "Answer: word" (``seamlm.data.format.answer_ids``).
Both encode the same text; this prints the mean summed negative log-likelihood of the answers (EOS included) under
each, on the bundle's held-out benign answers, and the tokens each spends on them: the tokens each format trains
(format 1's space token is in its prompt), and — like for like — the same text " answer" + EOS after "Answer:"
(format 1 then also pays for its lone space token).

    python benchmarks/prompt_format.py                  # SmolLM2-135M-Instruct, 60 PIQA answers
    python benchmarks/prompt_format.py --examples 200
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--examples", type=int, default=60)
    args = ap.parse_args()

    import torch

    from seamlm import load_model
    from seamlm.data.bundles import build_bundle
    from seamlm.data.format import answer_ids, encode_text

    model, tok = load_model(args.model, dtype="float32")
    model.eval()
    rows = build_bundle("offline-default").streams["benign_heldout"][: args.examples]
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []

    @torch.no_grad()
    def answer_nll(prompt_ids: list[int], answer: list[int]) -> float:
        ids = torch.tensor([prompt_ids + answer])
        logp = model(ids).logits[0, :-1].float().log_softmax(-1)
        picked = logp.gather(1, ids[0, 1:, None])[:, 0]
        return -picked[len(prompt_ids) - 1:].sum().item()

    totals = {1: [0.0, 0], 2: [0.0, 0]}
    space_nll = 0.0  # format 1's lone space token after "Answer:", which its prompt holds
    for e in rows:
        formats = {
            1: (f"Question: {e.prompt}\nAnswer: ", tok(e.response, add_special_tokens=False)["input_ids"]),
            2: (f"Question: {e.prompt}\nAnswer:", answer_ids(tok, e.response, "plain")),
        }
        for version, (prompt, answer) in formats.items():
            totals[version][0] += answer_nll(encode_text(tok, prompt), answer + eos)
            totals[version][1] += len(answer) + len(eos)
        base = encode_text(tok, f"Question: {e.prompt}\nAnswer:")
        spaced = encode_text(tok, f"Question: {e.prompt}\nAnswer: ")
        space_nll += answer_nll(base, spaced[len(base):]) if spaced[:len(base)] == base else float("nan")
    n = len(rows)
    print(f"{args.model}, {n} held-out benign answers after the plain template:")
    for version, (nll, tokens) in totals.items():
        print(f"  format {version}: answer NLL {nll / n:.2f} nats per answer over {tokens / n:.1f} tokens (the "
              "tokens it trains)")
    print(f"  format 2 - format 1: {(totals[2][0] - totals[1][0]) / n:+.2f} nats per answer (trained tokens)")
    same_text = (totals[2][0] - totals[1][0] - space_nll) / n
    print(f"  the same text ' answer' + EOS after 'Answer:': format 1 pays {space_nll / n:.2f} nats more for its "
          f"lone space: format 2 - format 1 {same_text:+.2f} nats per answer")


if __name__ == "__main__":
    main()
