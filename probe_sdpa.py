import math, statistics, traceback
import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend

torch.manual_seed(0)
dev = 'cuda'
aten = torch.ops.aten
LN2 = math.log(2.0)
LOG2E = 1.0 / LN2


def P(*a):
    print(*a, flush=True)


def desc(t):
    if isinstance(t, torch.Tensor):
        s = f"T{tuple(t.shape)} {t.dtype} st={t.stride()} contig={t.is_contiguous()} dev={t.device.type}"
        if t.numel() <= 4 and t.numel() > 0:
            try:
                s += f" val={t.tolist()}"
            except Exception:
                pass
        return s
    return repr(t)


def T(label, fn):
    try:
        return fn()
    except Exception as e:
        P(f"    [ERR] {label}: {type(e).__name__}: {str(e)[:300]}")
        return None


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


P("torch", torch.__version__, "cuda", torch.version.cuda)
P("torch.version.cudnn", getattr(torch.version, 'cudnn', None), "backends.cudnn.version", torch.backends.cudnn.version())
P("GPU", torch.cuda.get_device_name(), torch.cuda.get_device_capability())

OPS = ['_scaled_dot_product_cudnn_attention', '_scaled_dot_product_cudnn_attention_backward',
       '_scaled_dot_product_flash_attention', '_scaled_dot_product_flash_attention_backward',
       '_scaled_dot_product_efficient_attention', '_scaled_dot_product_efficient_attention_backward']
for n in OPS:
    T(n, lambda: P("SCHEMA", getattr(aten, n).default._schema))

S_ = 0.1  # non-default scale on purpose
B, H, L, D = 6, 3, 256, 64


def mk_view(kind, x):
    if kind == 'seqview':
        return x.view(1, 4, 256, 12, 64)[:, :, 1::2, 4:8].flatten(0, 1).transpose(1, 2)
    return x.view(1, 4, 256, 12, 64)[:, :, 0::2, 0::3].flatten(0, 1).transpose(1, 2)


def inputs(kind, dtype=torch.bfloat16):
    if kind == 'contig':
        return [torch.randn(B, H, L, D, device=dev, dtype=dtype) for _ in range(3)]
    return [mk_view(kind, torch.randn(1, 1024, 12, 64, device=dev, dtype=dtype)) for _ in range(3)]


def gapped_like(t):
    # (b,h,l,d) logical, memory (b,l,2h,d) with every other head slot used
    b, h, l, d = t.shape
    buf = torch.zeros(b, l, 2 * h, d, device=t.device, dtype=t.dtype)
    v = buf[:, :, 1::2].transpose(1, 2)
    v.copy_(t)
    return v


def blhd_like(t):
    b, h, l, d = t.shape
    v = torch.empty(b, l, h, d, device=t.device, dtype=t.dtype).transpose(1, 2)
    v.copy_(t)
    return v


def ref_fwd(q, k, v, causal, s):
    q, k, v = q.float(), k.float(), v.float()
    Sm = (q @ k.transpose(-1, -2)) * s
    if causal:
        lq, lk = Sm.shape[-2:]
        m = torch.ones(lq, lk, dtype=torch.bool, device=Sm.device).tril()
        Sm = Sm.masked_fill(~m, float('-inf'))
    return torch.softmax(Sm, -1) @ v, torch.logsumexp(Sm, -1), Sm


def ref_grads(q, k, v, g, causal, s):
    qq, kk, vv = [t.detach().float().requires_grad_() for t in (q, k, v)]
    o, _, _ = ref_fwd(qq, kk, vv, causal, s)
    o.backward(g.float())
    return qq.grad, kk.grad, vv.grad


def manual_bwd(g, o, lse_nat, q, k, v, Sm, s):
    g, o = g.float(), o.float()
    Pm = torch.exp(Sm - lse_nat.float().unsqueeze(-1))
    dv = Pm.transpose(-1, -2) @ g
    dP = g @ v.float().transpose(-1, -2)
    delta = (g * o).sum(-1, keepdim=True)
    dS = Pm * (dP - delta)
    return dS @ k.float() * s, dS.transpose(-1, -2) @ q.float() * s, dv


def lse3(lse, l):
    x = lse
    if x.dim() == 4 and x.shape[-1] == 1:
        x = x.squeeze(-1)
    return x[..., :l].float()


def fwd(name, q, k, v, causal, s=S_):
    if name == 'cudnn':
        return aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=s)
    if name == 'flash':
        return aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=s)
    return aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=s)


UNITS = {}


def check_fwd(name, kind, causal, dtype=torch.bfloat16):
    q, k, v = inputs(kind, dtype)
    P(f"\n== FWD {name} {kind} {dtype} causal={causal} q={desc(q)}")
    r = T('fwd', lambda: fwd(name, q, k, v, causal))
    if r is None:
        return None
    for i, x in enumerate(r):
        P(f"    ret[{i}] {desc(x)}")
    o, lse = r[0], r[1]
    ro, rl, Sm = ref_fwd(q, k, v, causal, S_)
    with sdpa_kernel(SDPBackend.MATH):
        mo = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal, scale=S_)
    l = q.shape[2]
    l3 = lse3(lse, l)
    en = (l3 - rl).abs().max().item()
    e2 = (l3 - rl * LOG2E).abs().max().item()
    UNITS[name] = 'ln' if en < e2 else 'log2'
    pad = ''
    if lse.shape[-1] > l:
        pad = f" padded tail vals sample={lse[0, 0, l:l + 3].tolist()}"
    P(f"    out maxabs err vs F.sdpa math fp32={(o.float() - mo).abs().max().item():.3e} (vs manual {(o.float() - ro).abs().max().item():.3e})")
    P(f"    lse err natural-log={en:.3e}  log2-units={e2:.3e} -> {UNITS[name]}{pad}")
    return q, k, v, r


def show_grads(label, res, ref):
    if res is None:
        return
    dq, dk, dv = res[0], res[1], res[2]
    P(f"    OK {label}: rel dq={rel(dq, ref[0]):.2e} dk={rel(dk, ref[1]):.2e} dv={rel(dv, ref[2]):.2e} | dq {desc(dq)} dk.st={dk.stride()} dv.st={dv.stride()}")


def bwd(name, g, q, k, v, o, lse, r, causal, s=S_, **ov):
    """Standard call forms using values returned by forward r; overrides via ov."""
    if name == 'cudnn':
        a = dict(seed=r[6], off=r[7], bias=None, cq=r[2], ck=r[3], mq=r[4], mk=r[5])
        a.update(ov)
        return aten._scaled_dot_product_cudnn_attention_backward(
            g, q, k, v, o, lse, a['seed'], a['off'], a['bias'], a['cq'], a['ck'], a['mq'], a['mk'], 0.0, causal, scale=s)
    if name == 'flash':
        a = dict(cq=r[2], ck=r[3], mq=r[4], mk=r[5], seed=r[6], off=r[7])
        a.update(ov)
        return aten._scaled_dot_product_flash_attention_backward(
            g, q, k, v, o, lse, a['cq'], a['ck'], a['mq'], a['mk'], 0.0, causal, a['seed'], a['off'], scale=s)
    a = dict(bias=None, seed=r[2], off=r[3], mask=[True, True, True, False])
    a.update(ov)
    return aten._scaled_dot_product_efficient_attention_backward(
        g, q, k, v, a['bias'], o, lse, a['seed'], a['off'], 0.0, a['mask'], causal, scale=s)


E0 = lambda: torch.empty(0, device=dev)

# ---------------- forwards ----------------
FW = {}
for name in ['cudnn', 'flash', 'efficient']:
    for kind in ['contig', 'seqview', 'headview']:
        for causal in [False, True]:
            FW[(name, kind, causal)] = check_fwd(name, kind, causal)
for causal in [False, True]:
    FW[('efficient', 'contig32', causal)] = check_fwd('efficient', 'contig', causal, torch.float32)

# ---------------- basic backwards (forward-returned args) ----------------
BW_BIAS = {}


def basic_bwd(name, key):
    f = FW.get(key)
    if f is None:
        return
    q, k, v, r = f
    causal = key[2]
    o, lse = r[0], r[1]
    g = torch.randn(q.shape, device=dev, dtype=q.dtype)
    ref = ref_grads(q, k, v, g, causal, S_)
    P(f"\n== BWD {name} {key[1]} causal={causal}")
    if name == 'cudnn':
        for bl, bias in [('None', None), ('empty(0)', E0())]:
            res = T(f'bias={bl}', lambda: bwd(name, g, q, k, v, o, lse, r, causal, bias=bias))
            show_grads(f'bias={bl}', res, ref)
            if res is not None:
                BW_BIAS.setdefault(name, bias)
    elif name == 'efficient':
        for bl, bias in [('None', None), ('empty(0)', E0())]:
            res = T(f'bias={bl}', lambda: bwd(name, g, q, k, v, o, lse, r, causal, bias=bias))
            show_grads(f'bias={bl}', res, ref)
            if res is not None:
                BW_BIAS.setdefault(name, bias)
    else:
        res = T('fwd-returned args', lambda: bwd(name, g, q, k, v, o, lse, r, causal))
        show_grads('fwd-returned args', res, ref)


for name in ['cudnn', 'flash', 'efficient']:
    for kind in ['contig', 'seqview', 'headview']:
        for causal in [False, True]:
            basic_bwd(name, (name, kind, causal))
for causal in [False, True]:
    basic_bwd('efficient', ('efficient', 'contig32', causal))


def bias_kw(name):
    return {'bias': BW_BIAS.get(name)} if name in ('cudnn', 'efficient') else {}


# ---------------- delta / lse recompute tests ----------------
def recompute_test(name, key):
    f = FW.get(key)
    if f is None:
        return
    q, k, v, r = f
    causal = key[2]
    o, lse = r[0], r[1]
    l = q.shape[2]
    g = torch.randn(q.shape, device=dev, dtype=q.dtype)
    _, rl, Sm = ref_fwd(q, k, v, causal, S_)
    kw = bias_kw(name)
    P(f"\n== RECOMPUTE {name} {key[1]} causal={causal} (lse units {UNITS.get(name)})")
    base = T('base', lambda: bwd(name, g, q, k, v, o, lse, r, causal, **kw))
    if base is None:
        return
    lse_nat = lse3(lse, l) if UNITS.get(name) == 'ln' else lse3(lse, l) * LN2
    # (a) grad_out*0.5, out*2
    g2, o2 = (g.float() * 0.5).to(g.dtype), (o.float() * 2.0).to(o.dtype)
    m = T('g/2,o*2', lambda: bwd(name, g2, q, k, v, o2, lse, r, causal, **kw))
    if m is not None:
        man = manual_bwd(g2, o2, lse_nat, q, k, v, Sm, S_)
        P(f"    (g*0.5,o*2): rel(dv', 0.5dv)={rel(m[2], 0.5 * base[2].float()):.2e} rel(dq', 0.5dq)={rel(m[0], 0.5 * base[0].float()):.2e} "
          f"rel(dq', dq)={rel(m[0], base[0]):.2e} | vs manual-formula(given g',o',lse): dq={rel(m[0], man[0]):.2e} dk={rel(m[1], man[1]):.2e} dv={rel(m[2], man[2]):.2e}")
        man0 = manual_bwd(g2, o, lse_nat, q, k, v, Sm, S_)  # if backend ignored out / used internal delta
        P(f"       vs formula with ORIGINAL out (i.e. delta not from given out): dq={rel(m[0], man0[0]):.2e}")
    # (b) lse shifted so that P halves
    shift = LN2 if UNITS.get(name) == 'ln' else 1.0
    lse_s = lse + shift
    m2 = T('lse+shift', lambda: bwd(name, g, q, k, v, o, lse_s, r, causal, **kw))
    if m2 is not None:
        man = manual_bwd(g, o, lse_nat + LN2, q, k, v, Sm, S_)
        P(f"    (lse+{shift:.4f}): rel(dv', 0.5dv)={rel(m2[2], 0.5 * base[2].float()):.2e} rel(dv', dv)={rel(m2[2], base[2]):.2e} "
          f"rel(dq', 0.5dq)={rel(m2[0], 0.5 * base[0].float()):.2e} | vs manual-formula: dq={rel(m2[0], man[0]):.2e} dv={rel(m2[2], man[2]):.2e}")


for name in ['cudnn', 'flash', 'efficient']:
    for causal in [False, True]:
        recompute_test(name, (name, 'contig', causal))
    recompute_test(name, (name, 'seqview', False))

# ---------------- timing ----------------
def bench(fn, iters=20, warm=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def timing_inputs(cfg):
    if cfg == 'contig224':
        return [torch.randn(224, 4, 2048, 64, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    out = []
    for _ in range(3):
        x = torch.randn(1, 262144, 12, 64, device=dev, dtype=torch.bfloat16)
        if cfg == 'view128':
            out.append(x.view(1, 128, 2048, 12, 64)[:, :, :, 0:4].flatten(0, 1).transpose(1, 2))
        else:
            out.append(x.view(1, 64, 4096, 12, 64)[:, :, 1::2, 4:8].flatten(0, 1).transpose(1, 2))
    return out


P("\n== TIMING (ms, median of 20; TFLOP/s counts 4*B*H*L*L*D fwd, 2.5x that bwd, halved for causal)")
for cfg in ['contig224', 'view128', 'view64']:
    try:
        q, k, v = timing_inputs(cfg)
    except Exception as e:
        P(f"  [ERR] inputs {cfg}: {str(e)[:300]}")
        continue
    Bq, Hq, Lq, Dq = q.shape
    for causal in ([False, True] if cfg == 'contig224' else [False]):
        fl = 4 * Bq * Hq * Lq * Lq * Dq * (0.5 if causal else 1.0)
        for name in ['cudnn', 'flash']:
            def run_one():
                r = fwd(name, q, k, v, causal)
                tf = bench(lambda: fwd(name, q, k, v, causal))
                g = torch.randn(q.shape, device=dev, dtype=q.dtype)
                kw = bias_kw(name)
                tb = bench(lambda: bwd(name, g, q, k, v, r[0], r[1], r, causal, **kw))
                P(f"  {cfg} q{tuple(q.shape)} st={q.stride()} causal={causal} {name}: fwd {tf:.3f} ms ({fl / tf / 1e9:.0f} TF/s)  bwd {tb:.3f} ms ({2.5 * fl / tb / 1e9:.0f} TF/s)  out.st={r[0].stride()}")
            T(f'timing {cfg} {name} causal={causal}', run_one)
            torch.cuda.empty_cache()
    del q, k, v
    torch.cuda.empty_cache()

# ---------------- argument variants ----------------
def variants(name, key):
    f = FW.get(key)
    if f is None:
        return
    q, k, v, r = f
    causal = key[2]
    o, lse = r[0], r[1]
    l = q.shape[2]
    g = torch.randn(q.shape, device=dev, dtype=q.dtype)
    ref = ref_grads(q, k, v, g, causal, S_)
    kw = bias_kw(name)
    P(f"\n== VARIANTS {name} {key[1]} causal={causal}  lse returned {desc(lse)}")
    bq, hq = q.shape[0], q.shape[1]
    l3c = lse3(lse, l).contiguous()
    lse_nc_t = torch.empty(bq, l, hq, device=dev, dtype=torch.float32).transpose(1, 2)
    lse_nc_t.copy_(l3c)
    lse_nc_g = torch.zeros(bq, hq, l, 2, device=dev, dtype=torch.float32)[..., 0]
    lse_nc_g.copy_(l3c)
    Ls = {'(B,H,L) contig copy': l3c, '(B,H,L,1) contig copy': l3c.unsqueeze(-1).contiguous(),
          'non-contig transposed (B,L,H)->(B,H,L)': lse_nc_t, 'non-contig gapped [...,0] of (B,H,L,2)': lse_nc_g}
    if name == 'efficient':
        pl = (l + 31) // 32 * 32
        padded = torch.full((bq, hq, pl), float('inf'), device=dev)
        padded[..., :l] = l3c
        Ls['padded to 32 with +inf (own copy)'] = padded
    for ln, lt in Ls.items():
        res = T(f'lse {ln}', lambda: bwd(name, g, q, k, v, o, lt, r, causal, **kw))
        show_grads(f'lse {ln}', res, ref)
    if name == 'cudnn':
        for lbl, ov in [('cum_seq=empty(0)', dict(cq=E0(), ck=E0())), ('cum_seq=None', dict(cq=None, ck=None)),
                        ('max_q/k=L ints', dict(mq=l, mk=l)), ('max_q/k=0', dict(mq=0, mk=0)),
                        ('seed/off=empty(0)', dict(seed=E0(), off=E0())),
                        ('all empty + L', dict(cq=E0(), ck=E0(), mq=l, mk=l, seed=E0(), off=E0()))]:
            res = T(lbl, lambda: bwd(name, g, q, k, v, o, lse, r, causal, **kw, **ov))
            show_grads(lbl, res, ref)
    if name == 'flash':
        for lbl, ov in [('cum_seq=empty(0)', dict(cq=E0(), ck=E0())), ('cum_seq=None', dict(cq=None, ck=None)),
                        ('max_q/k=L ints', dict(mq=l, mk=l)), ('max_q/k=0', dict(mq=0, mk=0)),
                        ('rng/unused=empty(0)', dict(seed=E0(), off=E0())),
                        ('all empty + L', dict(cq=E0(), ck=E0(), mq=l, mk=l, seed=E0(), off=E0()))]:
            res = T(lbl, lambda: bwd(name, g, q, k, v, o, lse, r, causal, **kw, **ov))
            show_grads(lbl, res, ref)
    if name == 'efficient':
        for lbl, ov in [('seed/off=empty(0)', dict(seed=E0(), off=E0())), ('mask all True', dict(mask=[True] * 4))]:
            res = T(lbl, lambda: bwd(name, g, q, k, v, o, lse, r, causal, **kw, **ov))
            show_grads(lbl, res, ref)
    # strided grad_out / out
    for lbl, gg, oo in [('g gapped-view', gapped_like(g), o), ('o gapped-view', g, gapped_like(o)),
                        ('g+o gapped-view', gapped_like(g), gapped_like(o)),
                        ('g BLHD-layout', blhd_like(g), o), ('o BLHD-layout', g, blhd_like(o)),
                        ('g+o BLHD-layout', blhd_like(g), blhd_like(o)),
                        ('g,o contiguous()', g.contiguous(), o.contiguous())]:
        res = T(lbl, lambda: bwd(name, gg, q, k, v, oo, lse, r, causal, **kw))
        show_grads(lbl, res, ref)
    if key[1] != 'contig':
        # seq-view-like grad_out (same construction as inputs)
        gv = mk_view(key[1], torch.zeros(1, 1024, 12, 64, device=dev, dtype=q.dtype))
        gv.copy_(g)
        ov_ = mk_view(key[1], torch.zeros(1, 1024, 12, 64, device=dev, dtype=q.dtype))
        ov_.copy_(o)
        for lbl, gg, oo in [('g input-style view', gv, o), ('o input-style view', g, ov_), ('g+o input-style view', gv, ov_)]:
            res = T(lbl, lambda: bwd(name, gg, q, k, v, oo, lse, r, causal, **kw))
            show_grads(lbl, res, ref)
    torch.cuda.synchronize()


for name in ['cudnn', 'flash', 'efficient']:
    for kind in ['contig', 'seqview', 'headview']:
        T(f'variants {name} {kind}', lambda: variants(name, (name, kind, False)))
    T(f'variants {name} contig causal', lambda: variants(name, (name, 'contig', True)))
P("\nDONE")
