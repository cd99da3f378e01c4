#!/usr/bin/env python3
"""Checks the layering of src/ (docs/ARCHITECTURE.md) from the code's own imports.

Reads every `use` item and every `crate::` / `super::` / `self::` path in the code (comments and
string literals left out) of every file under src/, resolves each to the file that defines the
module it names, and fails when:

- two files import each other, directly or through others (an import cycle);
- a file imports from a component it may not import from (an upward import: see COMPONENTS);
- a file other than lib.rs imports an item through the crate root (`crate::Item`) instead of
  from the module where it lives;
- a file is longer than LONG_FILE lines without saying in its opening comment why it is one
  cohesive thing (the word "cohesive").

    python3 scripts/check-layers.py           # the check (exit 1 on a violation)
    python3 scripts/check-layers.py --graph   # also print the component graph and file edges

Standard library only: CI runs it before the build.
"""

import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
LONG_FILE = 650

# (component, path prefix under src/, components it may import from). The order is the layering,
# bottom first; a file belongs to the first component whose prefix matches.
COMPONENTS = [
    ("io", "io/", []),
    ("ops", "ops/", []),
    ("cpu", "backend/cpu/", ["ops"]),
    ("kernels", "backend/kernels/", ["ops"]),
    ("cuda", "backend/cuda.rs", ["kernels", "ops"]),
    ("emulated", "backend/emulated/", ["kernels", "ops"]),
    ("backend", "backend/", ["cpu", "kernels", "cuda", "emulated", "ops"]),
    ("dispatch", "dispatch/", ["cpu", "kernels", "cuda", "emulated", "ops"]),
    ("dist", "dist/", ["dispatch", "ops"]),
    ("clip", "clip/", ["dist", "dispatch", "ops"]),
    ("stats", "stats.rs", ["dispatch", "ops"]),
    ("accum", "accum/", ["dispatch", "ops"]),
    ("policy", "policy/", ["clip", "stats", "dispatch", "ops", "io"]),
    ("optim", "optim/", ["policy", "clip", "dist", "stats", "dispatch", "ops", "io"]),
    ("amp", "amp/", ["optim", "policy", "clip", "dist", "stats", "dispatch", "ops", "io"]),
    ("checkpoint", "checkpoint/", ["amp", "optim", "policy", "clip", "accum", "dispatch", "ops", "io"]),
    ("lib", "lib.rs", None),  # the crate root re-exports the public API: anything
]


def component_of(rel):
    for name, prefix, _ in COMPONENTS:
        if rel == prefix or rel.startswith(prefix):
            return name
    return None


def module_of(rel):
    """Module path (list of names under `crate`) of a file path relative to src/."""
    parts = rel[:-3].split("/")
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return parts


def strip_comments_and_strings(text):
    """The code with comments, string and char literals blanked (newlines kept)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            end = n if end < 0 else end + 1 + len(hashes)
            out.append(re.sub(r"[^\n]", " ", text[i:end]))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(re.sub(r"[^\n]", " ", text[i:j + 1]))
            i = j + 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:i + 4] + " "):
            m = re.match(r"'(\\.|[^\\'])'", text[i:])
            out.append(" " * len(m.group(0)))
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def expand_use_tree(tree):
    """`a::{b, c::{d, self}}` -> ["a::b", "a::c::d", "a::c"]."""
    tree = re.sub(r"\s+", "", tree)
    tree = re.sub(r"\bas\w+", "", tree.replace("as", " as ")).replace(" ", "")

    def split_top(s):
        parts, depth, cur = [], 0, ""
        for ch in s:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        if cur:
            parts.append(cur)
        return parts

    def expand(prefix, s):
        i = s.find("{")
        if i < 0:
            full = prefix + s
            return [full[: -len("::self")] if full.endswith("::self") else full]
        head, inner = s[:i], s[i + 1 : s.rfind("}")]
        out = []
        for part in split_top(inner):
            out.extend(expand(prefix + head, part))
        return out

    return expand("", tree)


def inline_modules(code):
    """For each character offset's line: the inline-module path at that line (list)."""
    stack, depth, per_line = [], 0, []
    pending = None
    for line in code.split("\n"):
        per_line.append([name for name, _ in stack])
        for m in re.finditer(r"\bmod\s+(\w+)\s*\{|[{}]", line):
            tok = m.group(0)
            if tok.startswith("mod"):
                depth += 1
                stack.append((m.group(1), depth))
            elif tok == "{":
                depth += 1
            else:
                if stack and stack[-1][1] == depth:
                    stack.pop()
                depth -= 1
        del pending
        pending = None
    return per_line


def main():
    files = {}
    for dirpath, _, names in os.walk(ROOT):
        for name in names:
            if name.endswith(".rs"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
                files[rel] = open(path, encoding="utf-8").read()
    modules = {tuple(module_of(rel)): rel for rel in files}
    root_modules = {m[0] for m in modules if m}

    def resolve(current, path):
        """The file that defines the module a path names (longest module prefix), or None."""
        parts = path.split("::")
        base = list(current)
        if parts[0] == "crate":
            base, parts = [], parts[1:]
        elif parts[0] in ("super", "self"):
            while parts and parts[0] in ("super", "self"):
                if parts[0] == "super":
                    base = base[:-1]
                parts = parts[1:]
        elif tuple(base + [parts[0]]) not in modules:
            # A path from another crate (or a local item), not one of this crate's modules.
            return None, False
        full = base + [p for p in parts if p != "*"]
        for k in range(len(full), -1, -1):
            if tuple(full[:k]) in modules:
                rest = full[k:]
                return modules[tuple(full[:k])], (k == 0 and bool(rest) and rest[0] not in root_modules)
        return None, False

    problems = []
    edges = {}
    for rel, text in sorted(files.items()):
        code = strip_comments_and_strings(text)
        file_module = module_of(rel)
        per_line = inline_modules(code)
        line_starts = [0]
        for line in code.split("\n"):
            line_starts.append(line_starts[-1] + len(line) + 1)

        def line_of(offset):
            lo, hi = 0, len(line_starts) - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if line_starts[mid] <= offset:
                    lo = mid
                else:
                    hi = mid - 1
            return lo

        targets = []
        use_spans = []
        for m in re.finditer(r"\buse\s+([^;]+);", code):
            use_spans.append((m.start(), m.end()))
            current = file_module + per_line[line_of(m.start())]
            for p in expand_use_tree(m.group(1)):
                targets.append((current, p, line_of(m.start()) + 1))
        for m in re.finditer(r"(?<![\w:])\w+(?:::\w+)+", code):
            if any(a <= m.start() < b for a, b in use_spans):
                continue
            current = file_module + per_line[line_of(m.start())]
            targets.append((current, m.group(0), line_of(m.start()) + 1))
        for current, path, line in targets:
            target, through_root = resolve(current, path)
            if target is None:
                continue
            if through_root and rel != "lib.rs":
                problems.append(f"src/{rel}:{line}: `{path}` is imported through the crate root; import it from the module where it lives")
            if target != rel:
                edges.setdefault(rel, {}).setdefault(target, line)

        lines = text.count("\n") + 1
        if lines > LONG_FILE:
            opening = "\n".join(l for l in text.split("\n")[:40] if l.startswith("//!"))
            if "cohesive" not in opening:
                problems.append(f"src/{rel}: {lines} lines, and its opening comment does not say why it is one cohesive thing (split it, or say so)")

    # Upward imports.
    allowed = {name: deps for name, _, deps in COMPONENTS}
    for a, targets in sorted(edges.items()):
        ca = component_of(a)
        for b, line in sorted(targets.items()):
            cb = component_of(b)
            if ca is None or cb is None:
                problems.append(f"src/{a}: no component for src/{a if ca is None else b}: add it to COMPONENTS in scripts/check-layers.py")
                continue
            if ca != cb and allowed[ca] is not None and cb not in allowed[ca]:
                problems.append(f"src/{a}:{line}: `{ca}` imports from `{cb}` (src/{b}), which it may not (see COMPONENTS)")

    # Cycles between files (Tarjan's strongly connected components).
    index, low, on_stack, stack, sccs = {}, {}, set(), [], []
    counter = [0]

    def strongconnect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(sorted(scc))

    sys.setrecursionlimit(10000)
    for v in sorted(files):
        if v not in index:
            strongconnect(v)
    for scc in sccs:
        detail = "; ".join(f"src/{a} -> src/{b}" for a in scc for b in edges.get(a, {}) if b in scc)
        problems.append(f"import cycle of {len(scc)} files: {detail}")

    if "--graph" in sys.argv:
        comp_edges = {}
        for a, targets in edges.items():
            for b in targets:
                ca, cb = component_of(a), component_of(b)
                if ca != cb:
                    comp_edges.setdefault(ca, set()).add(cb)
        print("components (bottom first) and what they import:")
        for name, _, _ in COMPONENTS:
            print(f"  {name:10} -> {', '.join(sorted(comp_edges.get(name, []))) or '-'}")
        print("file edges:")
        for a in sorted(edges):
            print(f"  src/{a} -> {', '.join('src/' + b for b in sorted(edges[a]))}")

    n_edges = sum(len(t) for t in edges.values())
    if problems:
        print(f"check-layers: {len(problems)} problem(s) in {len(files)} files, {n_edges} import edges:")
        for p in problems:
            print("  " + p)
        return 1
    print(f"check-layers: {len(files)} files, {n_edges} import edges between files: no cycle, no upward import, no import through the crate root, no long file without a reason")
    return 0


if __name__ == "__main__":
    sys.exit(main())
