// The GPT of model.py written again in plain JavaScript, to run in a browser (or Node) with no dependency.
// Same names and order as model.py: MLP, CausalSelfAttention, Block, GPT; then generate.py's KV cache, window
// restart and sampling (temperature, top-k, top-p) with a seeded generator. One token at a time, batch of one. Its
// W x runs in a small WebAssembly SIMD kernel where the browser has one (Kernel, below the model), else in JavaScript.
// Read it beside model.py; python -m minigpt.web inlines it into the page, and tests/test_web.py holds the two equal.
"use strict";

// ---- the pieces: vectors are Float32Arrays, sums run in JavaScript's 64-bit numbers ----

function linear(x, w, b, nOut) {  // y = W x + b; W (nOut, nIn) row-major, as nn.Linear stores it
  const kernel = KERNELS.get(w.buffer), y = kernel ? kernel.matvec(x, w, nOut) : matvec(x, w, nOut);
  if (b) for (let j = 0; j < nOut; j++) y[j] += b[j];
  return y;
}

function matvec(x, w, nOut) {  // W x in JavaScript, the sums in 64-bit numbers
  const nIn = x.length, y = new Float32Array(nOut);
  let o = 0;
  for (; o + 8 <= nOut; o += 8) {  // eight rows at a time, each x[i] read once for them: 2x one row
    const r0 = o * nIn, r1 = r0 + nIn, r2 = r1 + nIn, r3 = r2 + nIn, r4 = r3 + nIn, r5 = r4 + nIn, r6 = r5 + nIn, r7 = r6 + nIn;
    let s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
    for (let i = 0; i < nIn; i++) {
      const xi = x[i];
      s0 += w[r0 + i] * xi; s1 += w[r1 + i] * xi; s2 += w[r2 + i] * xi; s3 += w[r3 + i] * xi;
      s4 += w[r4 + i] * xi; s5 += w[r5 + i] * xi; s6 += w[r6 + i] * xi; s7 += w[r7 + i] * xi;
    }
    y[o] = s0; y[o + 1] = s1; y[o + 2] = s2; y[o + 3] = s3; y[o + 4] = s4; y[o + 5] = s5; y[o + 6] = s6; y[o + 7] = s7;
  }
  for (; o < nOut; o++) {
    let s = 0;
    for (let i = 0, r = o * nIn; i < nIn; i++) s += w[r + i] * x[i];
    y[o] = s;
  }
  return y;
}

function layerNorm(x, p) {  // nn.LayerNorm: zero mean, unit variance (eps 1e-5), then a learned scale and shift
  let mean = 0, v = 0;
  for (const a of x) mean += a;
  mean /= x.length;
  for (const a of x) v += (a - mean) * (a - mean);
  const inv = 1 / Math.sqrt(v / x.length + 1e-5), y = new Float32Array(x.length);
  for (let i = 0; i < x.length; i++) y[i] = (x[i] - mean) * inv * p.weight[i] + p.bias[i];
  return y;
}

function erf(x) {  // Math has no erf: Abramowitz and Stegun 7.1.26, within 1.5e-7 of it (a float32's precision)
  const t = 1 / (1 + 0.3275911 * Math.abs(x));
  const y = 1 - t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    * Math.exp(-x * x);
  return x < 0 ? -y : y;
}

const gelu = (x) => 0.5 * x * (1 + erf(x / Math.SQRT2));  // F.gelu, the exact one (not the tanh approximation)

class MLP {
  constructor(p, C) { this.p = p; this.C = C; }
  forward(x) {  // widen 4x, GELU, back to C
    const h = linear(x, this.p.fc.weight, this.p.fc.bias, 4 * this.C).map(gelu);
    return linear(h, this.p.proj.weight, this.p.proj.bias, this.C);
  }
}

class CausalSelfAttention {
  constructor(p, cfg) { this.p = p; this.nh = cfg.n_head; this.C = cfg.n_embd; }
  forward(x, cache) {  // x (C,) the newest token; cache.k, cache.v (block_size, C) hold the S earlier positions
    const C = this.C, nh = this.nh, hs = C / nh, S = cache.n;
    const qkv = linear(x, this.p.qkv.weight, this.p.qkv.bias, 3 * C);  // queries, keys and values in one matmul
    cache.k.set(qkv.subarray(C, 2 * C), S * C);  // this position's key and value join the cache
    cache.v.set(qkv.subarray(2 * C), S * C);
    cache.n = S + 1;
    const y = new Float32Array(C), mean = new Float32Array(S + 1);  // mean: attention over heads, for the page
    const att = new Float64Array(S + 1), acc = new Float64Array(hs), k = cache.k, v = cache.v, root = Math.sqrt(hs);
    for (let h = 0, o = 0; h < nh; h++, o += hs) {  // head h: columns o .. o + hs of the queries, keys and values
      // scores scaled by 1/sqrt(hs); the newest token sees every cached key, none of the future (there is none)
      let max = -Infinity, sum = 0;
      for (let j = 0; j <= S; j++) {
        let s = 0;
        for (let i = 0, r = j * C + o; i < hs; i++) s += qkv[o + i] * k[r + i];
        if ((att[j] = s / root) > max) max = att[j];
      }
      for (let j = 0; j <= S; j++) sum += (att[j] = Math.exp(att[j] - max));
      acc.fill(0);
      for (let j = 0; j <= S; j++) {
        const a = (att[j] /= sum);
        mean[j] += a / nh;
        for (let i = 0, r = j * C + o; i < hs; i++) acc[i] += a * v[r + i];
      }
      y.set(acc, o);  // heads side by side
    }
    this.last = mean;
    return linear(y, this.p.proj.weight, this.p.proj.bias, C);
  }
}

class Block {  // pre-norm: normalise, transform, add back
  constructor(p, cfg) {
    this.ln_1 = p.ln_1; this.attn = new CausalSelfAttention(p.attn, cfg);
    this.ln_2 = p.ln_2; this.mlp = new MLP(p.mlp, cfg.n_embd);
  }
  forward(x, cache) {
    const a = this.attn.forward(layerNorm(x, this.ln_1), cache);
    x = x.map((v, i) => v + a[i]);
    const m = this.mlp.forward(layerNorm(x, this.ln_2));
    return x.map((v, i) => v + m[i]);
  }
}

class GPT {
  constructor(config, p, simd = true) {
    // p: the tensors by model.py's names, dequantized (see loadModel); simd: the matrices go into a Kernel where
    // there is WebAssembly SIMD (false: every product in JavaScript)
    this.config = config;
    if (simd && SIMD && config.n_embd % 4 === 0) Kernel.place(p, config);  // the kernel reads 4 floats at a time
    this.tok_emb = p.tok_emb; this.pos_emb = p.pos_emb;
    this.blocks = p.blocks.map((b) => new Block(b, config));
    this.ln_f = p.ln_f;  // lm_head is tok_emb: weight tying, as in model.py
  }
  newCaches() {
    const n = this.config.block_size * this.config.n_embd;
    return this.blocks.map(() => ({ k: new Float32Array(n), v: new Float32Array(n), n: 0 }));
  }
  forward(id, caches, logits = true) {
    // one token id at the next position -> logits (V,); every layer's cache grows by one. logits false: only the
    // caches grow (a token read before the last one of a prompt: its 9,017 logits would be thrown away)
    const C = this.config.n_embd, pos = caches[0].n;
    let x = new Float32Array(C);
    for (let i = 0; i < C; i++) x[i] = this.tok_emb[id * C + i] + this.pos_emb[pos * C + i];
    this.blocks.forEach((b, l) => { x = b.forward(x, caches[l]); });
    if (!logits) return null;
    return linear(layerNorm(x, this.ln_f), this.tok_emb, null, this.config.vocab_size);
  }
}

// ---- writing (generate.py): a window of tokens, the caches of what was read, and sampling ----

function mulberry32(seed) {  // a small seeded generator of uniform numbers in [0, 1): the same seed, the same poem
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function softmax(logits, temperature = 1) {
  let max = -Infinity, sum = 0;
  for (const v of logits) max = Math.max(max, v);
  const p = new Float64Array(logits.length);
  for (let i = 0; i < p.length; i++) sum += (p[i] = Math.exp((logits[i] - max) / temperature));
  for (let i = 0; i < p.length; i++) p[i] /= sum;
  return p;
}

function topK(values, k) {  // the k largest as [[index, value], ...], largest first; ties: the lower index first
  const top = [];
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (top.length === k && v <= top[k - 1][1]) continue;  // most ids stop here: one pass, no sort of the vocabulary
    let j = top.length < k ? top.push(null) - 1 : k - 1;
    for (; j > 0 && top[j - 1][1] < v; j--) top[j] = top[j - 1];
    top[j] = [i, v];
  }
  return top;
}

function argmax(values) {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

function sampleNext(logits, { temperature = 0.8, top_k = 50, top_p = null }, random) {
  // sample_next: greedy at temperature 0, else drawn from the softmax after the top-k and top-p cuts
  if (temperature === 0) return argmax(logits);
  const order = topK(logits, top_k ? Math.min(top_k, logits.length) : logits.length);  // exactly k ids stay
  const p = softmax(order.map(([, v]) => v), temperature);
  let n = p.length;
  if (top_p) {  // nucleus: the likeliest ids until they add up to top_p, and no more
    let cum = 0;
    for (n = 0; n < p.length && (n === 0 || cum < top_p); n++) cum += p[n];
  }
  // inverse CDF: u in (0, total]; the first id whose running sum reaches u is drawn
  let total = 0, cum = 0;
  for (let i = 0; i < n; i++) total += p[i];
  const u = (1 - random()) * total;
  for (let i = 0; i < n; i++) if ((cum += p[i]) >= u) return order[i][0];
  return order[n - 1][0];
}

class Writer {
  // One text being written: the tokens in the window and the caches of what the model has read of them. A full
  // window restarts from its last half, as generate.Window does with the cache.
  constructor(model, promptIds) {
    this.model = model; this.W = model.config.block_size;
    this.read(this.ids = promptIds.slice(-this.W));
  }
  read(ids) {  // fresh caches, then every token of ids in turn: the last one's logits predict what comes next
    this.caches = this.model.newCaches();
    ids.forEach((id, j) => { this.logits = this.model.forward(id, this.caches, j === ids.length - 1); });
    this.looked = this.model.blocks.map((b) => b.attn.last);  // [layer][key]: the newest token's attention
  }
  append(id) {
    this.ids.push(id);
    if (this.ids.length > this.W) this.read(this.ids = this.ids.slice(-(this.W >> 1)));
    else {
      this.logits = this.model.forward(id, this.caches);
      this.looked = this.model.blocks.map((b) => b.attn.last);
    }
  }
  chance(ids) {  // P(the model writes ids next, one after the other); the writer itself does not move
    const saved = this.caches.map((c) => c.n);
    let logits = this.logits, caches = this.caches, p = 1;
    for (let j = 0; j < ids.length; j++) {
      if (j > 0 && caches[0].n < this.W) logits = this.model.forward(ids[j - 1], caches);
      else if (j > 0) {  // a full window restarts from its last half, as append does
        const w = new Writer(this.model, this.ids.concat(ids.slice(0, j)).slice(-(this.W >> 1)));
        logits = w.logits; caches = w.caches;
      }
      p *= softmax(logits)[ids[j]];
    }
    this.caches.forEach((c, l) => { c.n = saved[l]; });  // forget the peeked positions
    return p;
  }
}

// ---- the same W x in WebAssembly SIMD: four float32 products in one instruction, where the browser has it ----
// linear above is the model's arithmetic; this is only a faster way to do its W x (sums in float32, four rows at a
// time, the four lanes added at the end). The module below is assembled from its instructions, one line each; Kernel
// puts one model's matrices into a WebAssembly memory of its own. tests/test_web.py holds both paths to PyTorch.

const leb = (n) => {  // an unsigned number in LEB128: seven bits a byte, the high bit set on all but the last
  const out = [];
  do { let b = n & 127; n >>>= 7; if (n) b |= 128; out.push(b); } while (n);
  return out;
};
const vec = (items) => [...leb(items.length), ...items.flat()];
const section = (id, body) => [id, ...leb(body.length), ...body];
const name = (text) => vec([...text].map((c) => c.charCodeAt(0)));

function simdLinear() {
  // linear(w, x, y, nOut, nIn): y[o] = sum_i w[o * nIn + i] x[i]; w, x, y are byte offsets into the memory
  const [W, X, Y, NOUT, NIN, O, R0, R1, R2, R3, I, RB, XV, A0, A1, A2, A3] = [...Array(17).keys()];  // params, locals
  const get = (l) => [0x20, l], set = (l) => [0x21, l], i32 = (n) => [0x41, n];  // n < 64: one byte
  const add = 0x6a, mul = 0x6c, shl = 0x74, ltU = 0x49, gtU = 0x4b, f32add = 0x92, end = 0x0b;
  const simd = (op) => [0xfd, ...leb(op)];
  const load = [...simd(0), 4, 0], zero = [...simd(12), ...Array(16).fill(0)];  // v128.load (align 16), v128.const 0
  const fmul = simd(230), fadd = simd(228), lane = (k) => [...simd(31), k];  // f32x4.mul, f32x4.add, extract_lane
  const macc = (a, r) => [get(a), get(r), get(I), add, load, get(XV), fmul, fadd, set(a)];  // a += w[r + i..] * x[i..]
  const total = (a) => [get(a), lane(0), get(a), lane(1), f32add, get(a), lane(2), get(a), lane(3), f32add, f32add];
  const store = (a, k) => [get(Y), get(O), i32(2), shl, add, total(a), 0x38, 2, 4 * k];  // f32.store y[o + k]
  const rows = (n) => [  // while o + n <= nOut: n rows at a time, their products summed over i, 16 bytes a step
    0x02, 0x40, 0x03, 0x40,  // block, loop
    get(O), i32(n), add, get(NOUT), gtU, 0x0d, 1,  // o + n > nOut: out of the block
    get(W), get(O), get(RB), mul, add, set(R0), get(R0), get(RB), add, set(R1),
    get(R1), get(RB), add, set(R2), get(R2), get(RB), add, set(R3),
    [A0, A1, A2, A3].slice(0, n).map((a) => [zero, set(a)]), i32(0), set(I),
    0x03, 0x40,  // loop over i
    get(X), get(I), add, load, set(XV),
    [[A0, R0], [A1, R1], [A2, R2], [A3, R3]].slice(0, n).map(([a, r]) => macc(a, r)),
    get(I), i32(16), add, 0x22, I, get(RB), ltU, 0x0d, 0, end,  // i += 16 while i < row bytes
    [A0, A1, A2, A3].slice(0, n).map((a, k) => store(a, k)),
    get(O), i32(n), add, set(O), 0x0c, 0, end, end,  // o += n, again
  ];
  const body = [
    ...vec([[7, 0x7f], [5, 0x7b]]),  // locals: 7 i32 (o, r0-r3, i, rb), 5 v128 (xv, a0-a3)
    ...[get(NIN), i32(2), shl, set(RB), rows(4), rows(1), end].flat(Infinity),
  ];
  return new Uint8Array([0, 0x61, 0x73, 0x6d, 1, 0, 0, 0,  // \0asm, version 1
    ...section(1, vec([[0x60, ...vec(Array(5).fill(0x7f)), 0]])),  // type: (i32 x 5) -> ()
    ...section(2, vec([[...name("env"), ...name("memory"), 2, 0, 1]])),  // import: a memory, at least one page
    ...section(3, vec([[0]])),  // one function, of type 0
    ...section(7, vec([[...name("linear"), 0, 0]])),  // export: function 0 as linear
    ...section(10, vec([vec(body)]))]);  // code: its body
}

// compiled once; null where there is no WebAssembly SIMD (or a Content-Security-Policy forbids it): linear in JS
const SIMD = (() => { try { return new WebAssembly.Module(simdLinear()); } catch (e) { return null; } })();
const KERNELS = new WeakMap();  // a Kernel's memory -> the Kernel: linear looks its weights up here

class Kernel {
  static place(p, config) {  // move p's matrices (the four of each block, the token table) into a new Kernel
    const mats = [p.tok_emb];
    for (const b of p.blocks) mats.push(b.attn.qkv.weight, b.attn.proj.weight, b.mlp.fc.weight, b.mlp.proj.weight);
    const k = new Kernel(mats, 4 * config.n_embd, Math.max(config.vocab_size, 4 * config.n_embd)), views = k.views;
    p.tok_emb = views[0];
    p.blocks.forEach((b, l) => {
      [b.attn.qkv.weight, b.attn.proj.weight, b.mlp.fc.weight, b.mlp.proj.weight] = views.slice(1 + 4 * l, 5 + 4 * l);
    });
  }
  constructor(mats, maxIn, maxOut) {  // one memory: the matrices, then room for x and y, each 16-byte aligned
    const size = (n) => Math.ceil(n / 4) * 16, total = mats.reduce((t, m) => t + size(m.length), 0);
    const memory = new WebAssembly.Memory({ initial: Math.ceil((total + size(maxIn) + size(maxOut)) / 65536) });
    this.run = new WebAssembly.Instance(SIMD, { env: { memory } }).exports.linear;
    let at = 0;
    this.views = mats.map((m) => {
      const v = new Float32Array(memory.buffer, at, m.length);
      v.set(m);
      at += size(m.length);
      return v;
    });
    this.x = new Float32Array(memory.buffer, at, maxIn);
    this.y = new Float32Array(memory.buffer, at + size(maxIn), maxOut);
    KERNELS.set(memory.buffer, this);
  }
  matvec(x, w, nOut) {  // W x, W one of this kernel's views
    this.x.set(x);
    this.run(w.byteOffset, this.x.byteOffset, this.y.byteOffset, nOut, x.length);
    return this.y.slice(0, nOut);
  }
}

// ---- the weights: int8 rows with one float32 scale each (or float16), dequantized once when the page opens ----

function loadModel(meta, bytes, adapter, simd = true) {
  // meta: {config, tensors: {name: {shape, dtype, offset, scales}}}; bytes: a Uint8Array of every tensor;
  // adapter (optional): {meta, bytes} of a LoRA adapter (web.export_adapter), added to these weights;
  // simd false: every product in JavaScript (the page's #nosimd)
  const get = (name) => {
    const t = meta.tensors[name], n = t.shape.reduce((a, b) => a * b), cols = t.shape[t.shape.length - 1];
    const out = new Float32Array(n), view = new DataView(bytes.buffer, bytes.byteOffset);
    if (t.dtype === "float32") for (let i = 0; i < n; i++) out[i] = view.getFloat32(t.offset + 4 * i, true);
    else if (t.dtype === "int8") {
      for (let i = 0; i < n; i++) {
        out[i] = view.getInt8(t.offset + i) * view.getFloat32(t.scales + 4 * Math.floor(i / cols), true);
      }
    } else for (let i = 0; i < n; i++) out[i] = half(view.getUint16(t.offset + 2 * i, true));
    return out;
  };
  const wb = (pre) => ({ weight: get(pre + ".weight"), bias: get(pre + ".bias") });  // a norm's or a linear's
  const blocks = [];
  for (let l = 0; l < meta.config.n_layer; l++) {
    const b = `blocks.${l}.`;
    blocks.push({ ln_1: wb(b + "ln_1"), attn: { qkv: wb(b + "attn.qkv"), proj: wb(b + "attn.proj") },
                  ln_2: wb(b + "ln_2"), mlp: { fc: wb(b + "mlp.fc"), proj: wb(b + "mlp.proj") } });
  }
  const p = { tok_emb: get("tok_emb.weight"), pos_emb: get("pos_emb.weight"), blocks, ln_f: wb("ln_f") };
  if (adapter) applyAdapter(p, meta.config, adapter.meta, adapter.bytes);
  return new GPT(meta.config, p, simd);
}

function applyAdapter(p, config, meta, bytes) {
  // lora.py's merge, on the page: W += scale * B A for each adapted projection, B (out, r), A (r, in), and the trained
  // token rows written into the tied table
  const view = new DataView(bytes.buffer, bytes.byteOffset);
  const get = (name) => {
    const t = meta.tensors[name], out = new Float32Array(t.shape.reduce((a, b) => a * b));
    for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(t.offset + 4 * i, true);
    return out;
  };
  for (const [name, scale] of Object.entries(meta.scales)) {  // e.g. blocks.0.attn.qkv
    const [, l, part, proj] = name.split(".");
    const w = p.blocks[Number(l)][part][proj].weight, A = get(name + ".A"), B = get(name + ".B");
    const [r, nIn] = meta.tensors[name + ".A"].shape, nOut = meta.tensors[name + ".B"].shape[0];
    for (let o = 0; o < nOut; o++) {
      for (let k = 0; k < r; k++) {
        const s = scale * B[o * r + k];
        for (let i = 0; i < nIn; i++) w[o * nIn + i] += s * A[k * nIn + i];
      }
    }
  }
  if (meta.rows.length) {
    const rows = get("tok_emb.rows"), C = config.n_embd;
    meta.rows.forEach((id, k) => p.tok_emb.set(rows.subarray(k * C, (k + 1) * C), id * C));
  }
}

function half(h) {  // IEEE float16 bits -> number
  const e = (h >> 10) & 31, m = h & 1023, s = h >> 15 ? -1 : 1;
  if (e === 0) return s * m * 2 ** -24;
  return e === 31 ? (m ? NaN : s * Infinity) : s * (1 + m / 1024) * 2 ** (e - 15);
}

const minigpt = { GPT, Writer, loadModel, sampleNext, softmax, topK, argmax, mulberry32, gelu, SIMD, Kernel, matvec };
if (typeof module !== "undefined") module.exports = minigpt;  // Node (the parity test); in the page: a global
