"""Signal of one bad vs one clean record added to random coalitions, under value-function settings.

    MIRA_THREADS=1 python benchmarks/shed_marginal_probe.py boiler 10 '{}' '{"loss_weighting": "record"}'

Planted-noise data of one seed (as ``shed_planted_noise.py``: 240 Dolly records, a quarter corrupted, 200
validation records); 4 corrupted and 4 clean pool records are each added alone to 3 random coalitions of 12
pool records (plus 24 background records) and the marginal of v (LoRA on stories260K, paired batches) is
printed per setting (a JSON object of ``ShedSettings`` fields): delta = mean clean minus mean bad, sd = their
pooled spread, d = delta / sd."""
import json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np
import shed_common as C

def main():
    mode = sys.argv[1]; seed = int(sys.argv[2]); settings = [json.loads(a) for a in sys.argv[3:]]
    C.setup_torch()
    from mira.shed import ShedSettings
    from mira.shed.value import LoraValue, ProxyModel
    dolly = C.load_dolly(os.environ.get("MIRA_ASSETS", "../shared"))
    pool_i, val_i, test_i, res_i, _ = C.disjoint_parts(len(dolly), [240, 200, 200, 1000], seed)
    pool, bad = C.corrupt([dolly[i] for i in pool_i], 0.25, mode, seed, [dolly[i].output for i in res_i])
    val = [dolly[i] for i in val_i]
    rng = np.random.default_rng([seed, 5])
    perm = rng.permutation(240)
    bads = [i for i in perm if bad[i]][:4]; cleans = [i for i in perm if not bad[i]][:4]
    rest = [i for i in perm if i not in bads + cleans]
    bg = rest[:24]; ctxpool = rest[24:]
    players = bads + cleans + ctxpool[:36]  # 3 contexts of 12
    ctxs = [frozenset(range(8 + 12 * j, 8 + 12 * (j + 1))) for j in range(3)]
    base = ShedSettings(model=os.path.join(os.environ.get("MIRA_ASSETS", "../shared"), "models", "stories260K"), template="compact", steps=10, batch_size=8,
                        max_length=128, seed=seed)
    proxy = ProxyModel.load(base)
    for extra in settings:
        s = base.model_copy(update=extra)
        t0 = time.time()
        v = LoraValue(proxy, [pool[i] for i in players], val, s, background_records=[pool[i] for i in bg])
        m = np.zeros((3, 8))
        for j, c in enumerate(ctxs):
            b = v(c)
            for k in range(8):
                m[j, k] = v(c | {k}) - b
        mb, mc = m[:, :4], m[:, 4:]
        delta = mc.mean() - mb.mean()
        sd = np.sqrt((mb.var(ddof=1) + mc.var(ddof=1)) / 2)
        print(json.dumps({"setting": extra, "delta": delta, "sd": sd, "d": delta / sd,
                          "bad": np.round(mb, 5).tolist(), "clean": np.round(mc, 5).tolist(),
                          "wall": round(time.time() - t0)}), flush=True)

main()
