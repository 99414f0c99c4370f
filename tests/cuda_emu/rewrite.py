"""Rewrites a CUDA source so that g++ compiles it against pyengine's CUDA emulator (tests/cuda_emu).

Two constructs have no host C++ spelling and are rewritten; everything else stays byte for byte,
and every line keeps its number (compiler errors and device asserts point at the real source):

    K<<<grid, block[, shared[, stream]]>>>(args)
        -> ::pe_emu::launch(K, grid, block, shared, stream, "K", __FILE__, __LINE__)(args)
       K may be a template-id with commas (k<T, F>) and may stand on the line before <<<;
       the configuration ends at the first >>> outside parentheses.
    __shared__ T name[A][B];         -> T (&name)[A][B] = ::pe_emu::shared<T[A][B]>([] {}, "name");
    extern __shared__ T name[];      -> T (&name)[] = ::pe_emu::dynamic_shared<T>("name");
       (the lambda's type identifies the declaration site: one allocation per block and site)

Comments, string and character literals are left alone. Anything the rewriter cannot handle
faithfully (several declarators in one __shared__ declaration, an initializer, a configuration
with fewer than 2 or more than 4 values) raises RewriteError naming the line.

Usage: python tests/cuda_emu/rewrite.py IN.cu OUT.cpp, or `from rewrite import rewrite`.
"""
import re
import sys

__all__ = ["RewriteError", "rewrite", "edits"]


class RewriteError(ValueError):
    pass


def _code_mask(text):
    """A bytearray: 1 where text[i] is code, 0 inside comments and string / character literals."""
    mask = bytearray(len(text))
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
            continue
        m = re.match(r'R"([^()\\\s]{0,16})\(', text[i:i + 20]) if c == "R" else None
        if m and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            end = text.find(")" + m.group(1) + '"', i + m.end())
            i = n if end < 0 else end + len(m.group(1)) + 2
            continue
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            continue
        mask[i] = 1
        i += 1
    return mask


def _line_of(text, pos):
    return text.count("\n", 0, pos) + 1


def _skip_ws_back(text, i):
    while i >= 0 and text[i].isspace():
        i -= 1
    return i


def _kernel_start(text, mask, lt):
    """Start of the kernel expression that ends just before the <<< at `lt`."""
    i = _skip_ws_back(text, lt - 1)
    if i >= 0 and text[i] == ">":  # template arguments: back to the matching <
        depth = 0
        while i >= 0:
            if mask[i]:
                if text[i] in ">)]":
                    depth += 1
                elif text[i] in "<([":
                    depth -= 1
                    if depth == 0:
                        break
            i -= 1
        if i < 0:
            raise RewriteError(f"line {_line_of(text, lt)}: unbalanced template arguments "
                               "before <<<")
        i = _skip_ws_back(text, i - 1)
    end = i
    while i >= 0 and (text[i].isalnum() or text[i] in "_:"):
        i -= 1
    if i == end:
        raise RewriteError(f"line {_line_of(text, lt)}: no kernel name before <<<")
    return i + 1


def _split_top_level(text, mask, begin, end):
    """[(start, stop)] of the comma-separated parts of text[begin:end], at bracket depth 0."""
    parts, depth, start = [], 0, begin
    for i in range(begin, end):
        if not mask[i]:
            continue
        c = text[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append((start, i))
            start = i + 1
    parts.append((start, end))
    return parts


def _launch_edit(text, mask, lt):
    line = _line_of(text, lt)
    k0 = _kernel_start(text, mask, lt)
    k1 = _skip_ws_back(text, lt - 1) + 1
    depth, i, n = 0, lt + 3, len(text)
    while i < n:
        if mask[i]:
            c = text[i]
            if c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
            elif depth == 0 and text.startswith(">>>", i):
                break
        i += 1
    if i >= n:
        raise RewriteError(f"line {line}: no >>> closes the launch configuration")
    gt = i
    parts = _split_top_level(text, mask, lt + 3, gt)
    if not 2 <= len(parts) <= 4 or any(not text[a:b].strip() for a, b in parts):
        raise RewriteError(f"line {line}: a launch configuration has 2 to 4 values, got "
                           f"<<<{text[lt + 3:gt]}>>>")
    j = gt + 3
    while j < n and text[j].isspace():
        j += 1
    if j >= n or text[j] != "(":
        raise RewriteError(f"line {line}: no argument list after >>>")
    config = ",".join(text[a:b] for a, b in parts) + ", 0" * (4 - len(parts))
    name = " ".join(text[k0:k1].split()).replace("\\", "\\\\").replace('"', '\\"')
    replacement = (f"::pe_emu::launch({text[k0:k1]}{text[k1:lt]}, {config}, \"{name}\", "
                   f"__FILE__, __LINE__){text[gt + 3:j]}")
    return k0, j, replacement


_DECLARATOR = re.compile(r"(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]]*\]\s*)*)$")


def _shared_edit(text, mask, pos):
    line = _line_of(text, pos)
    # The declaration runs from the end of the previous statement to the next ';'.
    s = pos - 1
    while s >= 0 and not (mask[s] and text[s] in ";{}"):
        s -= 1
    s += 1
    while not mask[s] or text[s].isspace():  # comments and blank lines stay outside the span
        s += 1
    e, depth = pos, 0
    while e < len(text):
        if mask[e]:
            if text[e] in "([{":
                depth += 1
            elif text[e] in ")]}":
                depth -= 1
            elif text[e] == ";" and depth == 0:
                break
        e += 1
    if e >= len(text):
        raise RewriteError(f"line {line}: no ';' ends the __shared__ declaration")
    prefix = text[s:pos].split()
    decl = " ".join(text[pos + len("__shared__"):e].split())
    unknown = [w for w in prefix if w not in ("extern", "static", "volatile")]
    if unknown:
        raise RewriteError(f"line {line}: unsupported {' '.join(unknown)!r} before __shared__")
    if "=" in decl or "," in re.sub(r"<[^<>]*>|\([^()]*\)|\[[^\[\]]*\]", "", decl):
        raise RewriteError(f"line {line}: a __shared__ declaration needs one declarator without "
                           f"initializer, got {decl!r}")
    m = _DECLARATOR.search(decl)
    type_ = decl[:m.start()].strip() if m else ""
    if not m or not type_ or "__align__" in decl:
        raise RewriteError(f"line {line}: cannot parse the __shared__ declaration {decl!r}")
    if "volatile" in prefix:
        type_ = "volatile " + type_
    name, dims = m.group("name"), " ".join(m.group("dims").split()).replace("] [", "][")
    if "extern" in prefix:
        if dims != "[]":
            raise RewriteError(f"line {line}: extern __shared__ {name} must be an array of "
                               "unknown bound, T name[]")
        out = f'{type_} (&{name})[] = ::pe_emu::dynamic_shared<{type_}>("{name}");'
    elif "[]" in dims:
        raise RewriteError(f"line {line}: __shared__ {name}{dims} without extern needs its size")
    elif dims:
        out = f'{type_} (&{name}){dims} = ::pe_emu::shared<{type_}{dims}>([] {{}}, "{name}");'
    else:
        out = f'{type_}& {name} = ::pe_emu::shared<{type_}>([] {{}}, "{name}");'
    return s, e + 1, out + "\n" * text.count("\n", s, e + 1)


def launch_sites(text):
    """The kernel of every launch in text, as written (whitespace collapsed): the names the
    emulator reports in launch_sites()."""
    mask = _code_mask(text)
    names = []
    for m in re.finditer(r"<<<", text):
        if mask[m.start()]:
            k0 = _kernel_start(text, mask, m.start())
            k1 = _skip_ws_back(text, m.start() - 1) + 1
            names.append(" ".join(text[k0:k1].split()))
    return names


def edits(text):
    """[(start, end, replacement)] in source order: the spans rewrite() replaces."""
    mask = _code_mask(text)
    found = []
    for m in re.finditer(r"<<<", text):
        if mask[m.start()] and not (found and m.start() < found[-1][1]):
            found.append(_launch_edit(text, mask, m.start()))
    for m in re.finditer(r"\b__shared__\b", text):
        if mask[m.start()]:
            found.append(_shared_edit(text, mask, m.start()))
    found.sort()
    for a, b in zip(found, found[1:]):
        if b[0] < a[1]:
            raise RewriteError(f"line {_line_of(text, b[0])}: overlapping rewrites")
    return found


def rewrite(text, filename=None):
    """The rewritten text; with `filename`, a first `#line 1 "filename"` directive (it adds no
    line to the numbering) makes __FILE__ and diagnostics name the original source."""
    out, last = [], 0
    for start, end, replacement in edits(text):
        out.append(text[last:start])
        out.append(replacement)
        last = end
    out.append(text[last:])
    header = "" if filename is None else '#line 1 "%s"\n' % filename.replace("\\", "/")
    return header + "".join(out)


def main(argv):
    if len(argv) != 3:
        print("usage: rewrite.py IN.cu OUT.cpp", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        text = f.read()
    try:
        result = rewrite(text, argv[1])
    except RewriteError as e:
        print(f"{argv[1]}: {e}", file=sys.stderr)
        return 1
    with open(argv[2], "w", encoding="utf-8") as f:
        f.write(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
