"""The ``patchmosaic`` command line. Exit code 0 on success, 2 with a one-line reason on bad input."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from .demo import run_demo

    res = run_demo(out=args.out, n=args.n, steps=args.steps, seed=args.seed,
                   train_per_class=args.train_per_class, backend=args.backend, progress=not args.quiet)
    print(f"wrote {res['out']}: {args.n} boundary-aware ELS samples in {res['seconds']:.1f}s")
    for b in range(args.n):
        print(f"  seed {b}: label {int(res['labels'][b])}, {res['sources_per_sample'][b]} training images "
              f"contribute patches, distance to nearest training image {float(res['nearest_distance'][b]):.2f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="patchmosaic", description="Equivariant local score machines: patch mosaics.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="sample digits with the boundary-aware ELS machine from the built-in data",
                       description="Sample digits with the boundary-aware ELS machine from the built-in 2,000 "
                                   "MNIST digits and write a PNG: noise, sample, nearest training image, provenance.")
    d.add_argument("--out", default="patchmosaic_demo.png", help="PNG to write (default: %(default)s)")
    d.add_argument("--n", type=int, default=8, help="number of seeds, one digit class each (default: %(default)s)")
    d.add_argument("--steps", type=int, default=20, help="DDIM steps on the grid t_i = i/steps (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0, help="seed of the noise generator (default: %(default)s)")
    d.add_argument("--train-per-class", type=int, default=None,
                   help="use only this many training digits per class (default: all 200)")
    d.add_argument("--backend", default="auto", choices=["auto", "cpu", "torch", "cuda"],
                   help="engine (default: %(default)s)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=_demo)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        print(f"patchmosaic {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
