#!/usr/bin/env python3
"""Applies openvla-rs's one patch to candle-core 0.11.1's src/backprop.rs (vendor/candle-core).

candle's backward accumulates every gradient as `let g = grads.or_insert(x)?; *g = g.add(&d)?`:
`or_insert` allocates and zero-fills a `zeros_like(x)`, and the add makes a third pass over it,
for every node of the graph. This rewrites each such pair (add or sub, on one line) into
`grads.accumulate(x, &d)?` / `grads.accumulate_neg(x, &d)?`, which store `d` itself (made
contiguous) when `x` has no gradient yet (`g.dims()` and `g.device()` in between become `x`'s,
which are the same). Other sites are left as they are.

    python3 vendor/patch_candle_backprop.py vendor/candle-core/src/backprop.rs
"""
import re
import sys

HELPERS = '''    /// openvla-rs patch: adds `grad` to the gradient of `tensor`, storing it as it is (made
    /// contiguous) when there is none yet, instead of adding it to a fresh `zeros_like` (which
    /// cost a zero-fill and an extra pass over every gradient of the graph).
    fn accumulate(&mut self, tensor: &Tensor, grad: &Tensor) -> Result<()> {
        match self.0.entry(tensor.id()) {
            Entry::Occupied(entry) => {
                let sum = entry.into_mut();
                *sum = sum.add(grad)?;
            }
            Entry::Vacant(entry) => {
                let grad = if grad.is_contiguous() {
                    grad.clone()
                } else {
                    grad.contiguous()?
                };
                entry.insert(grad);
            }
        }
        Ok(())
    }

    /// openvla-rs patch: subtracts `grad` from the gradient of `tensor` ([`Self::accumulate`]).
    fn accumulate_neg(&mut self, tensor: &Tensor, grad: &Tensor) -> Result<()> {
        match self.0.entry(tensor.id()) {
            Entry::Occupied(entry) => {
                let sum = entry.into_mut();
                *sum = sum.sub(grad)?;
            }
            Entry::Vacant(entry) => {
                entry.insert(grad.neg()?);
            }
        }
        Ok(())
    }

'''


def main(path):
    s = open(path).read()
    if "fn accumulate(" in s:
        sys.exit(f"{path} is patched already")
    out, pending, counts = [], {}, {"add": 0, "sub": 0}
    let = re.compile(r"^(\s*)let (\w+) = grads\.or_insert\((.+)\)\?;\s*$")
    acc = re.compile(r"^(\s*)\*(\w+) = (\w+)\.(add|sub)\(&?(.+)\)\?;?\s*$")
    for line in s.split("\n"):
        # `g.dims()` / `g.device()` of the zero-filled gradient are those of its tensor.
        for var, (_, target) in pending.items():
            line = re.sub(rf"\b{var}\.(dims|device)\(\)", rf"{target}.\1()", line)
        m = let.match(line)
        if m:
            pending[m.group(2)] = (len(out), m.group(3))
            out.append(line)
            continue
        m = acc.match(line)
        if m and m.group(2) == m.group(3) and m.group(2) in pending:
            idx, target = pending.pop(m.group(2))
            out[idx] = None
            fn = "accumulate" if m.group(4) == "add" else "accumulate_neg"
            counts[m.group(4)] += 1
            out.append(f"{m.group(1)}grads.{fn}({target}, &{m.group(5)})?;")
            continue
        out.append(line)
    s = "\n".join(line for line in out if line is not None)
    anchor = "    fn or_insert(&mut self, tensor: &Tensor) -> Result<&mut Tensor> {"
    if anchor not in s:
        sys.exit("GradStore::or_insert not found: not candle-core 0.11.1's backprop.rs?")
    s = s.replace(anchor, HELPERS + anchor, 1)
    open(path, "w").write(s)
    print(f"rewrote {counts['add']} add and {counts['sub']} sub accumulations; "
          f"{s.count('grads.or_insert(')} or_insert sites left as they are")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "vendor/candle-core/src/backprop.rs")
