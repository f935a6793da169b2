"""The torch backend's fast decode step: the fused kernels of ``plugins_cuda/decode_step.cu``.

:class:`FusedDecoder` runs one token of every sequence of a batch through the model the backend loaded
(the reference ``MambaLM``: its parameters are used in place, nothing is copied but A = -exp(A_log),
and x_proj's transposed copies where the persistent kernel below runs),
reading and writing the recurrent state of each row in its slot of the stacked state buffers (no
gather or scatter). Its reference twin is that model's own ``forward`` at L = 1, which the GPU tests
compare it with (tests/runtime/test_fused_decode.py).

Two paths, chosen per batch bucket:

* GEMV (bucket of 1 or 2 rows): per layer ``norm_gemv`` (RMSNorm + in_proj) -> ``conv_xproj`` (conv update
  + SiLU + x_proj) -> ``ssm_step`` (dt_proj + softplus + state update + D + gate) -> ``gemv_residual``
  (out_proj + residual); the weights are streamed once, by the kernels themselves (the projections on
  the tensor cores for fp16/bf16 models whose rows are whole 16-byte vectors, FMA loops otherwise). For
  16-bit models up to d_model 1024 ``ssm_out`` takes the last two: the state update of a block's channels and
  their share of out_proj, added into an accumulator that the next ``norm_gemv`` adds to the residual
  (``decode_step.SSM_OUT``; benchmarks/NOTES.md item 80): three kernels per layer.
  At batch 1 on sm_90+ from mamba-790m up (where ssm_out does not serve the shape, from
  ``decode_step.LY_MIN_DMODEL``) every layer runs instead in one
  persistent kernel, ``layers`` (``decode_step.LAYERS_KERNEL``; benchmarks/NOTES.md item 39), after
  the embedding; it takes the head too, the final norm, the logits and the greedy argmax
  (``decode_step.LY_HEAD``; item 69), else the head's ``norm_gemv`` follows it.
* GEMM (more rows): the projections are cuBLAS matrix products (``torch.mm``), except on sm_90 those that
  ``decode_step.PROJ_WG`` names (in_proj, x_proj, out_proj and the head up to ``PROJ_WG_ROWS`` rows; x_proj and the
  head up to 64: ``PROJ_WG_MANY``, all four from mamba-1.4b up: ``PROJ_WG_MANY_BIG``; x_proj above:
  ``PROJ_WG_WIDE``), which our wgmma kernel ``proj_wg`` computes; the
  rest the same kernels (``embed``/``residual_norm`` one block per row; ``conv_xproj`` with its x_proj share for
  buckets of up to ``decode_step.XPROJ_FOLD_MAX_ROWS`` rows, without it (x_proj a GEMM) above;
  ``ssm_step`` computing dt_proj from x_proj's output for small buckets, ``ssm_step_pre`` reading
  delta from a dt_proj GEMM for large ones: ``decode_step.DT_FOLD_MAX_ROW_CHANNELS``; for buckets of
  9-16 rows from mamba-1.4b up, x_proj and dt_proj on the tensor cores in our ``conv_xproj_rows`` and
  ``dt_rows`` before ``ssm_step_pre``: ``decode_step.ROWS_*``; for buckets of 17-128 rows (17-32 from
  mamba-1.4b up) where ``proj_wg`` takes x_proj, its sums in float32 and ``dt_rows`` in place of the dt_proj
  GEMM: ``decode_step.DT_ROWS_*``), the head over the padded vocabulary.

A :class:`DecodeBucket` holds the static device buffers of one bucket size; :meth:`FusedDecoder.enqueue`
enqueues one step on the current stream (the backend captures it in a CUDA graph).
"""
from __future__ import annotations

from mamba_rt._optional import require
from mamba_rt.checkpoint import DTYPES, torch_dtype
from mamba_rt.errors import InternalError, UnsupportedError

torch = require("torch")


def why_unsupported(config, dtype: str) -> str | None:
    from mamba_rt.plugins_cuda import decode_step

    return decode_step.why_unsupported(config.d_state, config.d_conv, config.dt_rank, DTYPES[dtype])


class DecodeBucket:
    """Static buffers of one batch bucket: inputs (token ids, slot indices), scratch and logits."""

    def __init__(self, dec: "FusedDecoder", B: int):
        from mamba_rt.plugins_cuda import decode_step as ds

        c, dev, dt = dec.config, dec.device, dec.tdtype
        f32 = dict(dtype=torch.float32, device=dev)
        d, dm, R = c.d_inner, c.d_model, c.dt_rank + 2 * c.d_state
        self.B = B
        self.gemv = dec.k.gemv_fits(B, dm, d, aligned=dec.aligned)
        self.inp = torch.zeros(2, B, dtype=torch.int64, device=dev)
        self.ids, self.idx = self.inp[0], self.inp[1]  # token id and state slot of each row
        self.xz = torch.empty(B, 2 * d, dtype=dt, device=dev)
        self.u = torch.empty(B, d, dtype=dt, device=dev)
        self.y = torch.empty(B, d, dtype=dt, device=dev)
        self.logits = torch.empty(B, c.vocab_size, **f32)
        self.argmax_scratch = torch.zeros(dec.k.argmax_scratch_words(B, c.vocab_size), dtype=torch.int32, device=dev)
        # dt_proj and x_proj inside ssm_step / conv_xproj (always on the GEMV path); or, for GEMM-path buckets
        # of 9-16 rows of the larger models, both on the tensor cores in conv_xproj_rows / dt_rows (rows_path)
        self.rows = not self.gemv and dec.rows_path(B)
        self.fold_dt, self.fold_x = (True, True) if self.gemv else (False, False) if self.rows else dec.gemm_folds(B)
        # x_proj by proj_wg into a float32 accumulator and dt_proj in dt_rows, where both serve and x_proj takes
        # proj_wg for B rows (dt_rows_path), instead of the dt_proj GEMM
        self.dtr = not (self.gemv or self.rows or self.fold_dt) and dec.dt_rows_path(B)
        # every layer in one persistent kernel (batch 1, decode_step.layers_launch)
        self.ly = dec.layers_launch() if self.gemv and B == 1 else None
        # ssm_step and out_proj in one kernel (ssm_out) on the GEMV path where the persistent kernel does not run:
        # out_proj's sums of each layer in an accumulator, the residual before each layer and the head in a buffer
        # of its own, written by the norm_gemv before it (the embedding's: the first)
        # `zeroed`, zeroed before every step (one memset, or the embedding kernel: embed_zeroes), where there is
        # one: ssm_out's accumulators (first: 16-byte reductions), x_proj's (added up by conv_xproj's or
        # conv_xproj_rows' blocks), then on the GEMV path a work counter per GEMV launch (the copy-engine kernels
        # hand out their rows through it); for the persistent kernel, its grid barrier's counter
        self.so = bool(self.gemv and not self.ly and dec.k.ssm_out_fits(B, n=c.d_state, dm=dm))
        n_out = c.n_layer * B * dm if self.so else 0
        Racc = dec.k.rows_stride(R) if self.rows else R  # the accumulator's row stride
        n_acc = c.n_layer * B * Racc if self.fold_x or self.rows else 0  # (added into: zeroed before each step)
        n_ctr = 2 * c.n_layer + 1 if self.gemv else 0
        n_ly = 1 if self.ly else 0
        n_zero = n_out + n_acc + n_ctr + n_ly
        self.zeroed = torch.zeros(n_zero, **f32) if n_zero else None
        if self.so:
            self.out_acc = self.zeroed[:n_out].view(c.n_layer, B, dm)
            self.hh = torch.empty(c.n_layer + 1, B, dm, **f32)
        self.h = self.hh[0] if self.so else torch.empty(B, dm, **f32)
        # by the embedding kernel, where the kernels after it touch them only after their griddepcontrol.wait
        # (the persistent kernel's step; decode_step.EMBED_ZEROES), else by a memset first
        self.embed_zeroes = bool(self.ly and self.zeroed is not None and ds.EMBED_ZEROES)
        if n_acc:
            self.acc = self.zeroed[n_out:n_out + n_acc].view(c.n_layer, B, Racc)
        elif self.dtr:  # written by x_proj's proj_wg, not added into: one buffer read by each layer's dt_rows in turn
            self.acc = torch.empty(B, dec.k.rows_stride(R), **f32).expand(c.n_layer, B, dec.k.rows_stride(R))
        if self.ly:
            self.bar = self.zeroed[-1:].view(torch.int32)
            # zeroed once: out_proj's partial sums, y and the step count, tagged by the kernel
            self.part = torch.zeros(2, self.ly.P, dm, dtype=torch.int64, device=dev)
            self.y_tagged = torch.zeros(d, dtype=torch.int32, device=dev)
            self.stepc = torch.zeros(1, dtype=torch.int32, device=dev)
            self.hbuf = torch.empty(2, dm, **f32)
            self.ss_layers = torch.empty(self.ly.grid, **f32)
        if self.gemv:
            self.ctr = self.zeroed[n_out + n_acc:n_out + n_acc + n_ctr].view(torch.int32)
            self.ge = dec.k.embed_grid(dm)
            self.ss_embed = torch.empty(self.ge, B, **f32)
            if not (self.ly or self.so):  # gemv_residual's partial sums of squares per row, one per block
                self.g4 = [dec.k.gemv_grid_residual(B, dm, d, l.mixer.out_proj.weight.data_ptr())
                           for l in dec.model.backbone.layers]
                self.ss = torch.empty(c.n_layer, max(self.g4), B, **f32)
        else:
            self.xn = torch.empty(B, dm, dtype=dt, device=dev)
            if not self.fold_x:  # x_proj's output in T for ssm_step (from the x_proj GEMM or proj_wg, or dt_rows)
                self.xdbl = torch.empty(B, R, dtype=dt, device=dev)
            if not self.fold_dt:  # the dt_proj GEMM's (or dt_rows') output
                self.delta = torch.empty(B, d, dtype=dt, device=dev)
            self.o = torch.empty(B, dm, dtype=dt, device=dev)
            # out_proj's sums of h^2 per block column of 16 or more outputs (proj_wg's residual epilogue, up to
            # decode_step.PROJ_RESIDUAL_ROWS rows: _prepare's reader)
            self.ssp = torch.empty(-(-dm // 16), B, **f32) if B <= ds.PROJ_RESIDUAL_ROWS else None
        self.launches = dec._prepare(self)
        self.embeds: dict = {}  # the embedding's launch per ids tensor other than self.ids (FusedDecoder.enqueue)
        # the greedy argmax taken by the head's norm_gemv itself (GEMV path, tensor-core kinds,
        # decode_step.HEAD_ARGMAX), its launch made per output tensor at first use (FusedDecoder.enqueue)
        self.head_argmax = bool(self.gemv and dec.k.takes_argmax(self.launches[-1]))
        if self.head_argmax:
            self.amax_scratch = torch.zeros(dec.k.gemv_argmax_words(self.launches[-1], B), dtype=torch.int32,
                                            device=dev)
            self.amax_heads: dict = {}


class FusedDecoder:
    """Fused decode steps of ``model`` (a CUDA ``MambaLM``) on the state ``conv`` [n_layer, slots, d,
    k-1] / ``ssm`` [n_layer, slots, d, n] (contiguous; updated in place, by slot)."""

    def __init__(self, model, conv, ssm, dtype: str, pdl: bool | None = None, gemv: str | None = None):
        from mamba_rt.plugins_cuda import decode_step

        self.config = c = model.config
        why = why_unsupported(c, dtype)
        if why:
            raise UnsupportedError(why)
        if not (conv.is_contiguous() and ssm.is_contiguous()):
            raise UnsupportedError("fused decode: the state buffers must be contiguous")
        self.model, self.conv, self.ssm = model, conv, ssm
        self.device, self.tdtype = conv.device, torch_dtype(dtype)
        with torch.cuda.device(self.device):
            ctx = decode_step.launcher._context(self.device.index)
            self.k = decode_step.kernels(DTYPES[dtype], int(ctx), pdl, gemv)
        self.eps = float(c.norm_epsilon)
        layers = model.backbone.layers
        self.A = [l.mixer.A().contiguous() for l in layers]
        self.conv_w = [l.mixer.conv1d.weight.reshape(c.d_inner, c.d_conv).contiguous() for l in layers]
        self.lm_head = model.lm_head.weight[: c.vocab_size]
        # the GEMM path's head runs over the padded vocabulary: cuBLAS picks a slow kernel for an N
        # that is not a multiple of 8 (50277 for the published models: 285 us at batch 64 on an H100
        # against 100 us for 50280); the padding rows' logits are dropped in the copy to float32
        self.lm_head_padded = model.lm_head.weight
        self._table = None  # the persistent kernel's pointers per layer (_layer_table)
        self._tmaps = []  # proj_wg's tensor maps in device memory, per launch
        self.aligned = all(w.data_ptr() % 16 == 0 for w in
                           [self.lm_head] + [p for l in layers for p in (l.mixer.in_proj.weight, l.mixer.out_proj.weight)])
        # the tokens each state slot was fed by these steps: the embedding marks every row's token in its slot
        # (decode_step.cu embed), the repetition penalty reads them (penalize); the sampler owns the rows
        # (runtime/backend_torch.py TorchSampler: zeroed, copied and topped up from the host's mask)
        self.seen = torch.zeros(conv.shape[1], self.k.seen_words(c.vocab_size), dtype=torch.int32,
                                device=self.device)

    @staticmethod
    def _p(t):
        return 0 if t is None else t.data_ptr()

    def layers_launch(self):
        """The launch configuration of the persistent kernel that runs every layer of a batch-1 step
        (decode_step.LayersLaunch: grid, shared bytes, stages, partial-sum slots and the kernel's
        switches), or None where it does not serve this model. Read at each bucket's creation
        (the tests switch decode_step.LAYERS_KERNEL and the others)."""
        c = self.config
        cfg = self.k.layers_launch(dm=c.d_model, d=c.d_inner, n=c.d_state, r=c.dt_rank, k=c.d_conv)
        return cfg if cfg is not None and self._layer_table()[1] else None  # the table: only where it applies

    def _layer_table(self):
        """(int64 device tensor [n_layer, LY_PTRS] of the persistent kernel's pointers per layer (.cu
        LayerPtrs), whether every one is 16-byte aligned), made at first use with x_proj's transposed
        copies W_x^T [d_inner, R] (the kernel copies the columns of a block's channels as one range)."""
        from mamba_rt.plugins_cuda import decode_step

        if self._table is None:
            p = self._p
            self._wx_t = [l.mixer.x_proj.weight.t().contiguous() for l in self.model.backbone.layers]
            rows = []
            for i, l in enumerate(self.model.backbone.layers):
                m = l.mixer
                rows.append([p(m.in_proj.weight), p(m.in_proj.bias), p(l.norm.weight), p(self.conv_w[i]),
                             p(m.conv1d.bias), p(self._wx_t[i]), p(m.dt_proj.weight), p(m.dt_proj.bias),
                             p(self.A[i]), p(m.D), p(m.out_proj.weight), p(m.out_proj.bias), p(self.conv[i]),
                             p(self.ssm[i])])
            if any(len(row) != decode_step.LY_PTRS for row in rows):
                raise InternalError(f"fused decode: {len(rows[0])} pointers per layer, the kernel takes "
                                    f"{decode_step.LY_PTRS}")
            aligned = all(v % 16 == 0 for row in rows for v in row)
            self._table = (torch.tensor(rows, dtype=torch.int64, device=self.device), aligned)
        return self._table

    def _prepare(self, bk: DecodeBucket):
        """The step's kernel launches for bucket ``bk`` (arguments fixed: the buffers are static)."""
        from mamba_rt.plugins_cuda import decode_step as ds

        c, k, p, B = self.config, self.k, self._p, bk.B
        d, dm, n, r = c.d_inner, c.d_model, c.d_state, c.dt_rank
        R = r + 2 * n
        emb = self.model.backbone.embedding.weight
        layers = self.model.backbone.layers
        res32 = c.residual_in_fp32
        fold_dt, fold_x = bk.fold_dt, bk.fold_x
        out = []
        seen = dict(seen=p(self.seen), idx=p(bk.idx), slots=self.seen.shape[0], seen_w=self.seen.shape[1])
        if bk.gemv:
            zero = dict(zero=p(bk.zeroed), nzero=bk.zeroed.numel()) if bk.embed_zeroes else {}
            out.append(k.embed(ids=p(bk.ids), emb=p(emb), h=p(bk.h), ss_out=p(bk.ss_embed), B=B,
                               V=emb.shape[0], K=dm, eps=self.eps, **zero, **seen))
            ss, G = bk.ss_embed, bk.ge
        else:
            out.append(k.embed(ids=p(bk.ids), emb=p(emb), h=p(bk.h), ss_out=0, B=B, V=emb.shape[0], K=dm,
                               eps=self.eps, norm_w=p(layers[0].norm.weight), xn=p(bk.xn), **seen))
        if bk.ly:  # every layer in one kernel, and the head (else the head reads its h and partial sums)
            out.append(k.layers(bk.ly, table=p(self._layer_table()[0]), idx=p(bk.idx), h=p(bk.h),
                                ss=p(bk.ss_layers), hbuf=p(bk.hbuf), xacc=p(bk.acc), part=p(bk.part),
                                y=p(bk.y_tagged), stepc=p(bk.stepc), bar=p(bk.bar), n_layer=c.n_layer, dm=dm, d=d,
                                n=n, r=r, k=c.d_conv, res_fp32=res32, eps=self.eps, head=p(self.lm_head),
                                head_bytes=self.lm_head.numel() * self.lm_head.element_size(),
                                head_norm=p(self.model.backbone.norm_f.weight), logits=p(bk.logits),
                                vocab=c.vocab_size))
            ss, G = bk.ss_layers, bk.ly.grid
            layers = []
            if out[-1].args.hw:  # the head too (decode_step.LY_HEAD)
                return out
        pend = None  # (index in out of the last out_proj, the residual_norm after it) until its reader is known

        def reader(ln):
            """ln, the projection that reads the last out_proj's residual add and norm (xn): with them in its and
            out_proj's epilogues where proj_wg runs both (decode_step.PROJ_RESIDUAL_ROWS), else after residual_norm."""
            nonlocal pend
            if pend is None:
                return ln
            j, rn = pend
            pend = None
            if B <= ds.PROJ_RESIDUAL_ROWS and not callable(ln) and not callable(out[j]):
                out[j] = k.with_residual(out[j], h=p(bk.h), norm_w=rn.args.norm_w, out=p(bk.xn), ldo=bk.xn.stride(0),
                                         ss=p(bk.ssp), res_fp32=res32)
                return k.with_row_scale(ln, ss=p(bk.ssp), tiles=out[j].grid[0], eps=self.eps)
            out.append(rn)
            return ln

        for i, layer in enumerate(layers):
            m = layer.mixer
            conv_i, ssm_i = p(self.conv[i]), p(self.ssm[i])
            if bk.gemv:
                out.append(k.norm_gemv(B, norm_w=p(layer.norm.weight), W=p(m.in_proj.weight), bias=p(m.in_proj.bias),
                                       out=p(bk.xz), N=2 * d, K=dm, out_float=False, eps=self.eps,
                                       ctr=p(bk.ctr[2 * i]), **self._residual_in(bk, i, ss, G)))
                out.append(k.conv_xproj(B, xz=p(bk.xz), conv_state=conv_i, idx=p(bk.idx), conv_w=p(self.conv_w[i]),
                                        conv_b=p(m.conv1d.bias), Wx=p(m.x_proj.weight), u=p(bk.u),
                                        xdbl=p(bk.acc[i]), B=B, d=d, k=c.d_conv, R=R))
                if bk.so:
                    out.append(k.ssm_out(B, n=n, xdbl_acc=p(bk.acc[i]), Wdt=p(m.dt_proj.weight),
                                         dt_bias=p(m.dt_proj.bias), A=p(self.A[i]), D=p(m.D), u=p(bk.u), xz=p(bk.xz),
                                         ssm_state=ssm_i, idx=p(bk.idx), d=d, r=r, Wo=p(m.out_proj.weight),
                                         bias=p(m.out_proj.bias), acc=p(bk.out_acc[i]), dm=dm))
                    continue
                out.append(k.ssm_step(n=n, B=B, xdbl_acc=p(bk.acc[i]), xdbl_t=0, delta=0, Wdt=p(m.dt_proj.weight),
                                      dt_bias=p(m.dt_proj.bias), A=p(self.A[i]), D=p(m.D), u=p(bk.u), xz=p(bk.xz),
                                      ssm_state=ssm_i, idx=p(bk.idx), y=p(bk.y), d=d, r=r))
                out.append(k.gemv_residual(B, y=p(bk.y), W=p(m.out_proj.weight), bias=p(m.out_proj.bias), h=p(bk.h),
                                           ss_out=p(bk.ss[i]), N=dm, K=d, res_fp32=res32, ctr=p(bk.ctr[2 * i + 1])))
                ss, G = bk.ss[i], bk.g4[i]
            else:
                out.append(reader(self._proj(bk.xn, m.in_proj, bk.xz, ds.PROJ_IN)))
                acc = p(bk.acc[i]) if fold_x else 0  # x_proj's sums (conv_xproj), else x_proj's output is xdbl
                if bk.rows:  # x_proj and dt_proj on the tensor cores, in our kernels
                    out.append(k.conv_xproj_rows(xz=p(bk.xz), conv_state=conv_i, idx=p(bk.idx),
                                                 conv_w=p(self.conv_w[i]), conv_b=p(m.conv1d.bias),
                                                 Wx=p(m.x_proj.weight), u=p(bk.u), acc=p(bk.acc[i]), B=B, d=d,
                                                 k=c.d_conv, n=n, r=r))
                    out.append(k.dt_rows(acc=p(bk.acc[i]), xdbl=p(bk.xdbl), delta=p(bk.delta),
                                         Wdt=p(m.dt_proj.weight), B=B, d=d, n=n, r=r))
                else:
                    out.append(k.conv_xproj(B if fold_x else 0, xz=p(bk.xz), conv_state=conv_i, idx=p(bk.idx),
                                            conv_w=p(self.conv_w[i]), conv_b=p(m.conv1d.bias),
                                            Wx=p(m.x_proj.weight) if fold_x else 0, u=p(bk.u), xdbl=acc, B=B, d=d,
                                            k=c.d_conv, R=R))
                    if bk.dtr:  # x_proj's sums in float32, then dt_rows (its output and delta in T)
                        xp = self._proj_launch(bk.u, m.x_proj.weight, None, bk.acc[i], ds.PROJ_X, out_float=True)
                        if xp is None:
                            raise InternalError("fused decode: proj_wg declined x_proj where dt_rows_path chose it")
                        out.append(xp)
                        out.append(k.dt_rows(acc=p(bk.acc[i]), xdbl=p(bk.xdbl), delta=p(bk.delta),
                                             Wdt=p(m.dt_proj.weight), B=B, d=d, n=n, r=r,
                                             row_blocks=max(2, -(-B // ds.DT_ROWS_BLOCK_ROWS))))
                    elif not fold_x:
                        out.append(self._proj(bk.u, m.x_proj, bk.xdbl, ds.PROJ_X))
                    if not (fold_dt or bk.dtr):
                        # bias: in the scan
                        out.append(self._proj(bk.xdbl[:, :r], m.dt_proj, bk.delta, ds.PROJ_DT, bias=False))
                out.append(k.ssm_step(n=n, B=B, xdbl_acc=acc, xdbl_t=0 if fold_x else p(bk.xdbl),
                                      delta=0 if fold_dt else p(bk.delta),
                                      Wdt=p(m.dt_proj.weight), dt_bias=p(m.dt_proj.bias), A=p(self.A[i]),
                                      D=p(m.D), u=p(bk.u), xz=p(bk.xz), ssm_state=ssm_i, idx=p(bk.idx),
                                      y=p(bk.y), d=d, r=r))
                out.append(self._proj(bk.y, m.out_proj, bk.o, ds.PROJ_OUT))
                nxt = layers[i + 1].norm.weight if i + 1 < len(layers) else self.model.backbone.norm_f.weight
                pend = (len(out) - 1, k.residual_norm(h=p(bk.h), o=p(bk.o), norm_w=p(nxt), xn=p(bk.xn), B=B, K=dm,
                                                      res_fp32=res32, eps=self.eps))
        if bk.gemv:
            out.append(k.norm_gemv(B, norm_w=p(self.model.backbone.norm_f.weight), W=p(self.lm_head), bias=0,
                                   out=p(bk.logits), N=c.vocab_size, K=dm, out_float=True, eps=self.eps,
                                   ctr=p(bk.ctr[-1]), **self._residual_in(bk, c.n_layer, ss, G)))
        else:
            head = self._proj_launch(bk.xn, self.lm_head, None, bk.logits, ds.PROJ_HEAD, out_float=True)
            if head is None:  # cuBLAS, into logits in T over the padded vocabulary, then copied to float32
                bk.logits_t = torch.empty(B, self.lm_head_padded.shape[0], dtype=self.tdtype, device=self.device)

                def head():
                    torch.mm(bk.xn, self.lm_head_padded.t(), out=bk.logits_t)
                    bk.logits.copy_(bk.logits_t[:, : c.vocab_size])
            out.append(reader(head))
        return out

    def _residual_in(self, bk: DecodeBucket, i: int, ss, G: int) -> dict:
        """The residual arguments of the GEMV path's norm_gemv before layer i (i = n_layer: the head): h with its
        partial sums of squares ss (G blocks' worth); or, where the layers run ssm_out, from layer 1 on, layer
        i - 1's out_proj sums added to the residual before layer i - 1 (the kernel writes the sum into the next
        buffer, .cu NormGemvArgs)."""
        p = self._p
        if not bk.so or i == 0:
            return dict(h=p(bk.h), ss=p(ss), G=G)
        return dict(h=p(bk.hh[i - 1]), ss=0, G=0, acc=p(bk.out_acc[i - 1]), res_fp32=self.config.residual_in_fp32)

    def _proj(self, x, lin, out, which, bias=True):
        """The GEMM path's projection ``out = x . lin.weight^T (+ lin.bias)``: our wgmma kernel where it serves
        and decode_step.PROJ_WG asks for it (``which``: its PROJ_* bit), else cuBLAS (a deferred call)."""
        ln = self._proj_launch(x, lin.weight, lin.bias if bias else None, out, which)
        return self._linear(x, lin, out, bias) if ln is None else ln

    def _proj_launch(self, x, w, bias, out, which, out_float=False):
        """proj_wg's launch for out [B, N] = x [B, K] . w [N, K]^T (+ bias), or None where it does not serve
        (the GPU, the dtype, decode_step.PROJ_WG, K, or rows that are not 16-byte aligned)."""
        (B, K), N = x.shape, w.shape[0]
        if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
            return None
        plan = self._proj_plan(B, K, w, which)
        if plan is None:
            return None
        maps = self.k.proj_maps(plan, x=x.data_ptr(), ldx=x.stride(0), W=w.data_ptr(), B=B, N=N, K=K)
        dev_maps = torch.frombuffer(bytearray(maps), dtype=torch.uint8).to(self.device)
        self._tmaps.append(dev_maps)  # kept as long as the decoder (its launches read them)
        return self.k.proj(plan, maps=dev_maps.data_ptr(), bias=self._p(bias), out=out.data_ptr(), ldo=out.stride(0),
                           B=B, N=N, K=K, out_float=out_float)

    def _proj_plan(self, B: int, K: int, w, which: int):
        """proj_wg's plan for B rows of x [B, K] times w [N, K]^T as projection ``which`` (a PROJ_* bit), or None
        where it does not serve (the GPU, the dtype, decode_step.PROJ_WG, K, or w not contiguous and 16-byte
        aligned). x's rows are _proj_launch's to check."""
        from mamba_rt.plugins_cuda import decode_step as ds

        big = self.proj_big()
        if not self.k.proj_serves(which, B, big) or w.data_ptr() % 16 or not w.is_contiguous():
            return None
        # in a big model's bucket past PROJ_WG_ROWS, in_proj with K unsplit (decode_step.PROJ_WG_MANY_BIG)
        return self.k.proj_plan(B, w.shape[0], K, unsplit=big and which == ds.PROJ_IN and B > ds.PROJ_WG_ROWS)

    def proj_big(self) -> bool:
        """Whether this model's in_proj has decode_step.PROJ_WG_BIG_BYTES or more (read at each call: the tests
        switch it): its GEMM buckets of up to 64 rows then take proj_wg for every projection but dt_proj."""
        from mamba_rt.plugins_cuda import decode_step as ds

        return 2 * self.config.d_inner * self.config.d_model * self.lm_head.element_size() >= ds.PROJ_WG_BIG_BYTES

    @staticmethod
    def _linear(x, lin, out, bias=True):
        """The GEMM path's projection ``out = x . lin.weight^T (+ lin.bias)`` as a deferred call."""
        w = lin.weight.t()
        if bias and lin.bias is not None:
            return lambda: torch.addmm(lin.bias, x, w, out=out)
        return lambda: torch.mm(x, w, out=out)

    def gemm_folds(self, B: int) -> tuple[bool, bool]:
        """(dt_proj inside ssm_step, x_proj inside conv_xproj) for a GEMM-path bucket of B rows, by the
        launch constants of decode_step (read at each bucket's creation: the tests switch them)."""
        from mamba_rt.plugins_cuda import decode_step as ds

        fold_dt = B * self.config.d_inner <= ds.DT_FOLD_MAX_ROW_CHANNELS
        return fold_dt, fold_dt and B <= ds.XPROJ_FOLD_MAX_ROWS and B in ds.XP_BUCKETS

    def rows_path(self, B: int) -> bool:
        """Whether a GEMM-path bucket of B rows runs x_proj and dt_proj in conv_xproj_rows / dt_rows: B in
        decode_step.ROWS_MIN_ROWS..ROWS_MAX_ROWS and d_inner at least ROWS_MIN_DINNER (read at each bucket's
        creation: the tests switch them), where those kernels serve the shape (DecodeKernels.rows_fits)."""
        from mamba_rt.plugins_cuda import decode_step as ds

        c = self.config
        return (bool(ds.ROWS_MIN_ROWS) and ds.ROWS_MIN_ROWS <= B <= ds.ROWS_MAX_ROWS
                and c.d_inner >= ds.ROWS_MIN_DINNER and self.k.rows_fits(n=c.d_state, r=c.dt_rank))

    def dt_rows_path(self, B: int) -> bool:
        """Whether a GEMM-path bucket of B rows (not rows_path, dt_proj not inside ssm_step) takes x_proj by
        proj_wg into a float32 accumulator and dt_proj in dt_rows instead of a dt_proj GEMM: B from
        decode_step.DT_ROWS_MIN_ROWS (0: never) to DT_ROWS_MAX_ROWS, or DT_ROWS_MAX_ROWS_BIG for a model whose in_proj
        has PROJ_WG_BIG_BYTES (read at each bucket's creation), where proj_wg takes x_proj for B rows and dt_rows
        serves the shape."""
        from mamba_rt.plugins_cuda import decode_step as ds

        c = self.config
        top = ds.DT_ROWS_MAX_ROWS_BIG if self.proj_big() else ds.DT_ROWS_MAX_ROWS
        return (bool(ds.DT_ROWS_MIN_ROWS) and ds.DT_ROWS_MIN_ROWS <= B <= top
                and c.d_inner % 8 == 0  # (u's rows for proj_wg)
                and self.k.rows_fits(n=c.d_state, r=c.dt_rank)
                and all(self._proj_plan(B, c.d_inner, l.mixer.x_proj.weight, ds.PROJ_X) is not None
                        for l in self.model.backbone.layers))

    def bucket(self, B: int) -> DecodeBucket:
        return DecodeBucket(self, B)

    @torch.no_grad()
    def enqueue(self, bk: DecodeBucket, argmax: "torch.Tensor | None" = None, host: int = 0,
                ids: "torch.Tensor | None" = None) -> None:
        """One decode step of bucket ``bk`` on the current stream: bk.ids (token per row) and bk.idx
        (slot per row) in, the slots' state updated, bk.logits [B, vocab_size] float32 out; with
        ``argmax`` (int64 (B,)) also the greedy token of each row, as enqueue_argmax gives it: taken
        by the head itself where bk.head_argmax, else by the argmax kernel after it. host: with argmax,
        where nonzero, the device address of mapped pinned host memory that gets the tokens too
        (launcher.mapped_host_address). ids: the token ids (int64 (B,), on this device, each in range)
        to read instead of bk.ids, e.g. those the step before left (no copy into bk.ids first)."""
        stream = torch.cuda.current_stream(self.device).cuda_stream
        launches = bk.launches
        head = None
        if argmax is not None and bk.head_argmax:
            self._check_ids_out(argmax, bk.B)
            key = (argmax.data_ptr(), host)
            head = bk.amax_heads.get(key)
            if head is None:
                head = bk.amax_heads[key] = self.k.with_argmax(
                    launches[-1], bk.B, out=argmax.data_ptr(), scratch=bk.amax_scratch.data_ptr(), out_host=host)
            launches = launches[:-1] + [head]
        if ids is not None:
            self._check_ids_out(ids, bk.B, "step: ids")
            emb = bk.embeds.get(ids.data_ptr())
            if emb is None:
                emb = bk.embeds[ids.data_ptr()] = self.k.with_ids(launches[0], ids.data_ptr())
            launches = [emb] + launches[1:]
        if bk.zeroed is not None and not bk.embed_zeroes:
            bk.zeroed.zero_()
        for ln in launches:
            if callable(ln):  # a cuBLAS projection (GEMM path)
                ln()
            else:
                self.k.launch(ln, stream)
        if argmax is not None and head is None:
            self.enqueue_argmax(bk, argmax, host)

    def enqueue_argmax(self, bk: DecodeBucket, out: "torch.Tensor", host: int = 0) -> None:
        """out [bk.B] int64 = the greedy token of each row of bk.logits, on the current stream (and at
        host, as in enqueue)."""
        self._argmax(bk.logits, out, bk.argmax_scratch, host)

    def argmax_fn(self, rows: int):
        """``argmax(logits, out, host=0)`` for a graph of ``rows`` rows (logits [rows, vocab_size] float32 on
        this device): the greedy kernel above, with a scratch of its own, on the current stream (and at host,
        as in enqueue). A graph that captures it must keep the function (its scratch) alive as long as the
        graph."""
        scratch = torch.zeros(self.k.argmax_scratch_words(rows, self.config.vocab_size), dtype=torch.int32,
                              device=self.device)
        return lambda logits, out, host=0: self._argmax(logits, out, scratch, host)

    def penalize(self, x: "torch.Tensor", idx: "torch.Tensor", r: "torch.Tensor") -> None:
        """The repetition penalty on x in place, on the current stream: row b's logits of the tokens its slot
        idx[b] was fed (self.seen) divided by r[b] where positive, else multiplied by it (runtime/sampling.py,
        step 1). x float32 (rows, vocab_size), idx int64 (rows,) (slots in range: the host's), r float32 (rows,)
        (1 for rows without a penalty), all contiguous on this device."""
        rows, V = x.shape[0], self.config.vocab_size
        for t, dt, shape in ((x, torch.float32, (rows, V)), (idx, torch.int64, (rows,)), (r, torch.float32, (rows,))):
            if t.dtype != dt or tuple(t.shape) != shape or not t.is_contiguous() or t.device != self.device:
                raise InternalError(f"fused decode penalize: expected contiguous {dt} {shape} on {self.device}, got "
                                    f"{t.dtype} {tuple(t.shape)} on {t.device}")
        ln = self.k.penalize(x=x.data_ptr(), idx=idx.data_ptr(), seen=self.seen.data_ptr(), r=r.data_ptr(), B=rows,
                             V=V, W=self.seen.shape[1], slots=self.seen.shape[0])
        self.k.launch(ln, torch.cuda.current_stream(self.device).cuda_stream)

    @property
    def draws(self) -> bool:
        """Whether :meth:`draw_fn` serves this model: the draw kernel needs thread block clusters (sm_90+)
        and holds a row of at most ``decode_step.DRAW_MAX_VOCAB`` logits in registers."""
        return self.k.draws(self.config.vocab_size)

    def draw_fn(self, rows: int):
        """``draw(logits, knobs, out, host=0)`` for a graph of ``rows`` rows: out (rows,) int64 = the
        tokens drawn by the draw kernel (as ``backend_torch.draw_torch`` draws them) from logits [rows,
        vocab_size] float32 with knobs [rows, 4] float64 (``backend_torch.sample_knobs``), on the
        current stream (and at host, as in enqueue). Where :attr:`draws`."""
        V = self.config.vocab_size

        def draw(logits, knobs, out, host=0):
            if (logits.dtype, tuple(logits.shape), knobs.dtype, tuple(knobs.shape), out.dtype, tuple(out.shape)) != (
                    torch.float32, (rows, V), torch.float64, (rows, 4), torch.int64, (rows,)) or not (
                    logits.is_contiguous() and knobs.is_contiguous() and out.is_contiguous()):
                raise InternalError(f"fused decode draw: expected contiguous float32 logits ({rows}, {V}), float64 "
                                    f"knobs ({rows}, 4), int64 out ({rows},); got {logits.dtype} "
                                    f"{tuple(logits.shape)}, {knobs.dtype} {tuple(knobs.shape)}, {out.dtype} "
                                    f"{tuple(out.shape)}")
            ln = self.k.draw(x=logits.data_ptr(), knobs=knobs.data_ptr(), out=out.data_ptr(), B=rows, V=V,
                             out_host=host)
            self.k.launch(ln, torch.cuda.current_stream(self.device).cuda_stream)

        return draw

    def _check_ids_out(self, out, B: int | None = None, what: str = "argmax: out") -> None:
        if (out.dtype != torch.int64 or out.dim() != 1 or not out.is_contiguous() or out.device != self.device
                or (B is not None and out.shape[0] != B)):
            raise InternalError(f"fused decode {what} must be contiguous int64 ({B or 'rows'},) on "
                                f"{self.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")

    def _argmax(self, logits, out, scratch, host: int = 0) -> None:
        self._check_ids_out(out)
        B, V = out.shape[0], self.config.vocab_size
        if logits.dtype != torch.float32 or tuple(logits.shape) != (B, V) or logits.device != self.device:
            raise InternalError(f"fused decode argmax: logits must be float32 ({B}, {V}) on {self.device}, got "
                                f"{logits.dtype} {tuple(logits.shape)} on {logits.device}")
        if scratch.numel() < self.k.argmax_scratch_words(B, V):
            raise InternalError(f"fused decode argmax: scratch of {scratch.numel()} words for {B} rows")
        logits = logits.contiguous()
        ln = self.k.argmax(x=logits.data_ptr(), out=out.data_ptr(), scratch=scratch.data_ptr(), B=B, V=V,
                           out_host=host)
        self.k.launch(ln, torch.cuda.current_stream(self.device).cuda_stream)
