#!/usr/bin/env python3
"""A stand-in solver for the demo and the tests (standard library, Python >= 3.6).

Reads material properties from ``*.dat`` files (one number each: yield strength and
tensile strength in MPa, reduction of area as a fraction), writes a cyclic
stress-strain curve (Ramberg-Osgood form) to ``Cyclic_SSCurve.csv`` and a short
``summary.txt``, like the MInt sample workflow's first step.
"""

import math
import os
import sys


def read_value(path):
    with open(path) as f:
        return float(f.read().split()[0])


def main(paths):
    values = {}
    for path in paths:
        values[os.path.splitext(os.path.basename(path))[0]] = read_value(path)
    sy = values.get("yield_strength", 350.0)
    su = values.get("tensile_strength", 1.5 * sy)
    ra = values.get("reduction_area", 0.5)
    modulus = 206000.0
    k_prime = 1.65 * su
    n_prime = 0.15 * (1.0 - ra) + 0.05
    rows = []
    for i in range(1, 41):
        stress = su * i / 40.0
        strain = stress / modulus + (stress / k_prime) ** (1.0 / n_prime)
        rows.append((strain, stress))
    with open("Cyclic_SSCurve.csv", "w") as f:
        f.write("strain,stress_MPa\n")
        for strain, stress in rows:
            f.write("%.6e,%.3f\n" % (strain, stress))
    with open("summary.txt", "w") as f:
        f.write("inputs: %s\n" % ", ".join(sorted(values)))
        f.write("K' = %.1f MPa, n' = %.4f\n" % (k_prime, n_prime))
        f.write("strain at UTS = %.4e\n" % rows[-1][0])
    print("sample_solver: wrote Cyclic_SSCurve.csv (%d points) and summary.txt" % len(rows))
    return 0 if math.isfinite(rows[-1][0]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
