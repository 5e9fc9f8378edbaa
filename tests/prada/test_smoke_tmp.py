from mira.prada.decoding import DecodeSettings, make_decoder


def test_smoke(client, pair, tokenizer, prompts):
    for p in prompts:
        print(len(p))
        outs = {}
        for mode in ("per-token", "speculative"):
            g = make_decoder(mode, client, pair, tokenizer, eos_ids=set()).generate(p, DecodeSettings(max_new_tokens=24))
            outs[mode] = g.token_ids
            print(mode, g.token_ids, g.metrics)
        assert outs["per-token"] == outs["speculative"]
