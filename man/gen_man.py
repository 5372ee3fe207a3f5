#!/usr/bin/env python3
"""Generates libcancel's manual pages from the public headers.

The contract of every public function is the comment above its prototype
(STYLE.md), so the pages are made from the headers at build time and never
checked in: a page cannot disagree with the header it documents.

  gen_man.py OUTDIR HEADER...

writes, for each header, OUTDIR/man7/<page>.7 (libcancel.7 for cancel.h,
libcancel-<name>.7 for cancel/<name>.h) from its top comment and section
banners, and OUTDIR/man3/<function>.3 for every public function: the
CANCEL_API prototypes and the static inline cancel_* functions, but not the
internal cancel__* ones.  Functions that share one comment share one page:
the first one's; the others are symbolic links to it (mandoc calls .so
fragile, and man-db follows either).  The pages are mdoc(7).

A public function without a comment directly above it (or directly above
the prototypes of its group, with no blank line between) stops the
generator with an error naming it: a new function gets documented or the
build fails.  Stale pages in OUTDIR/man3 and man7 are removed first.

The date of the pages is SOURCE_DATE_EPOCH when set (reproducible builds),
else the newest header's modification time.
"""

import errno
import os
import re
import sys
import time

# ----------------------------------------------------------------------
# Reading a header
# ----------------------------------------------------------------------


class Item:
    """One top-level thing of a header: a comment, a preprocessor line or a
    declaration (ending at ';' or, for an inline function, at its '}')."""

    def __init__(self, kind, text, l0, l1, standalone=True, raw=""):
        self.kind = kind  # 'comment', 'pp' or 'decl'
        self.text = text  # comment body, pp line, or decl without comments
        self.raw = raw  # decl as written, comments included
        self.l0 = l0  # first and last line (1-based)
        self.l1 = l1
        self.standalone = standalone  # comment: nothing before it on its line


def drop_cplusplus(text):
    """Blanks the #ifdef __cplusplus blocks (extern "C" braces would
    unbalance the scanner), keeping the line count."""
    out = []
    skipping = 0
    for line in text.split("\n"):
        s = line.strip()
        if skipping:
            if re.match(r"#\s*if", s):
                skipping += 1
            elif re.match(r"#\s*endif", s):
                skipping -= 1
            out.append("")
            continue
        if re.match(r"#\s*ifdef\s+__cplusplus\b", s):
            skipping = 1
            out.append("")
            continue
        out.append(line)
    return "\n".join(out)


def scan(text):
    text = drop_cplusplus(text)
    items = []
    n = len(text)
    i = 0
    line = 1
    at_line_start = True
    buf = []  # current declaration, comments replaced by a space
    raw_start = None
    decl_l0 = None
    depth = 0

    def buf_empty():
        return not "".join(buf).strip()

    def end_decl(j, l1):
        nonlocal buf, raw_start, decl_l0
        items.append(Item("decl", " ".join("".join(buf).split()), decl_l0, l1,
                          raw=text[raw_start:j]))
        buf = []
        raw_start = None
        decl_l0 = None

    while i < n:
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0:
                raise SystemExit("unterminated comment at line %d" % line)
            body = text[i + 2:j]
            l0 = line
            line += body.count("\n")
            if buf_empty():
                items.append(Item("comment", body, l0, line, at_line_start))
            else:
                buf.append(" ")
            i = j + 2
            at_line_start = False
            continue
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            if buf_empty():
                items.append(Item("comment", text[i + 2:j], line, line,
                                  at_line_start))
            i = j
            continue
        c = text[i]
        if c == "#" and at_line_start and buf_empty():
            j = i
            l0 = line
            while True:
                k = text.find("\n", j)
                k = n if k < 0 else k
                if text[j:k].rstrip().endswith("\\") and k < n:
                    line += 1
                    j = k + 1
                    continue
                break
            pp = text[i:k]
            pp = re.sub(r"/\*.*?\*/", " ", pp, flags=re.S)
            pp = re.sub(r"//.*", "", pp)
            items.append(Item("pp", " ".join(pp.replace("\\\n", " ").split()),
                              l0, line))
            i = k
            continue
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            buf.append(text[i:j + 1])
            i = j + 1
            at_line_start = False
            continue
        if c == "\n":
            line += 1
            at_line_start = True
            buf.append(c)
            i += 1
            continue
        if not c.isspace():
            at_line_start = False
            if buf_empty():
                buf = []
                raw_start = i
                decl_l0 = line
        buf.append(c)
        if c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
            if c == "}" and depth == 0:
                head = "".join(buf)
                head = head[:head.find("{")]
                if re.search(r"\)\s*$", head) and "=" not in head:
                    end_decl(i + 1, line)  # an inline function's body
        elif c == ";" and depth == 0:
            end_decl(i + 1, line)
        i += 1
    return items


def comment_lines(body):
    """A comment's text as lines, the ' * ' margin removed, the relative
    indentation kept."""
    lines = body.split("\n")
    out = []
    for k, ln in enumerate(lines):
        if k == 0:
            ln = ln[1:] if ln.startswith(" ") else ln
        else:
            m = re.match(r"^\s*\*( ?)", ln)
            if m and not ln.lstrip().startswith("*/"):
                ln = ln[m.end():]
            else:
                ln = ln.strip()
        out.append(ln.rstrip())
    while out and not out[0].strip():
        out.pop(0)
    while out and not out[-1].strip():
        out.pop()
    return out


def banner(body):
    """(title, text lines) when the comment is a section banner:
    /* ===== \\n * Title \\n * text \\n * ===== */ or /* ---- Title ---- * */."""
    lines = comment_lines(body)
    if not lines:
        return None
    if re.match(r"^=+$", lines[0].strip()):
        rest = [ln for ln in lines[1:] if not re.match(r"^=+$", ln.strip())]
        while rest and not rest[0].strip():
            rest.pop(0)
        if not rest:
            return None
        return rest[0].strip(), strip_blank(rest[1:])
    m = re.match(r"^-{2,}\s*(.*?)\s*-{2,}\s*\*?$", lines[0].strip())
    if m:
        return m.group(1), strip_blank(lines[1:])
    return None


def strip_blank(lines):
    lines = list(lines)
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


PUBLIC = re.compile(r"^cancel_(?!_)\w+$")


def drop_attributes(t):
    """t without its __attribute__((...)) specifiers."""
    while True:
        k = t.find("__attribute__")
        if k < 0:
            return t
        j = t.find("(", k)
        depth = 0
        for e in range(j, len(t)):
            depth += t[e] == "("
            depth -= t[e] == ")"
            if depth == 0:
                break
        t = (t[:k].rstrip() + " " + t[e + 1:].lstrip()).strip()


def function_of(decl):
    """(name, return type, [params], inline) of a public function's
    declaration, or None."""
    t = drop_attributes(decl.text)
    inline = False
    if t.startswith("CANCEL_API "):
        t = t[len("CANCEL_API "):]
    elif re.match(r"^static\s+inline\b", t):
        inline = True
        t = re.sub(r"^static\s+inline\s+", "", t)
        t = t[:t.find("{")] if "{" in t else t
    else:
        return None
    if t.startswith("typedef") or "(" not in t:
        return None
    m = re.match(r"^(.*?)\b(\w+)\s*\(", t)
    if not m:
        return None
    rtype, name = m.group(1).strip(), m.group(2)
    if not PUBLIC.match(name):
        return None
    # The parameter list: from that '(' to its matching ')'.
    start = m.end() - 1
    depth = 0
    for k in range(start, len(t)):
        if t[k] == "(":
            depth += 1
        elif t[k] == ")":
            depth -= 1
            if depth == 0:
                break
    plist = t[start + 1:k]
    params, depth, cur = [], 0, ""
    for ch in plist:
        if ch == "," and depth == 0:
            params.append(cur.strip())
            cur = ""
            continue
        depth += ch in "(["
        depth -= ch in ")]"
        cur += ch
    if cur.strip():
        params.append(cur.strip())
    params = [" ".join(p.split()) for p in params]
    params = [re.sub(r"\s*\*\s*", " *", p).replace("* *", "**")
              .replace("( *", "(*") for p in params]
    rtype = re.sub(r"\s*\*\s*$", " *", rtype)
    return name, rtype, params, inline


class Func:
    def __init__(self, name, rtype, params, inline, decl):
        self.name, self.rtype, self.params = name, rtype, params
        self.inline, self.decl = inline, decl
        self.group = None


class Group:
    """Functions that share one contract comment, hence one page."""

    def __init__(self, comment, section):
        self.comment = comment_lines(comment.text)
        self.funcs = []
        self.section = section  # index into Header.sections


class Header:
    def __init__(self, path):
        self.path = path
        base = os.path.basename(path)
        parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
        self.include = base if parent != "cancel" else "cancel/" + base
        stem = base[:-2]
        self.page = "libcancel" if self.include == "cancel.h" else \
            "libcancel-" + stem
        with open(path, encoding="utf-8") as f:
            text = f.read()
        self.items = scan(text)
        self.top = []
        for it in self.items:
            if it.kind == "comment":
                self.top = comment_lines(it.text)
            break
        top = " ".join(self.top)
        m = re.search(r"Link with ((?:-l\S+ ?)+)", top)
        self.link = m.group(1).rstrip(" .").split() if m else ["-lcancel"]
        self.library = "lib" + self.link[0][2:]
        self.pkgconfig = self.link[0][2:]
        self.version = None
        m = re.search(r'#define CANCEL_VERSION_STRING "([^"]+)"', text)
        if m:
            self.version = m.group(1)
        # The "Return values, for every function below" block, if any.
        self.common_returns = []
        for k, ln in enumerate(self.top):
            if ln.startswith("Return values, for every function"):
                blk = [ln]
                for ln2 in self.top[k + 1:]:
                    if not ln2.strip():
                        break
                    blk.append(ln2)
                self.common_returns = blk
                break
        self.parse()

    def parse(self):
        self.sections = [("", [])]  # (title, banner text)
        self.groups = []
        self.funcs = []
        self.types = []  # [(comment lines, [items])]
        errors = []
        prev = None  # the item before this one
        prev_func = None  # the Func declared by prev, if any
        for idx, it in enumerate(self.items):
            if idx == 0 and it.kind == "comment":
                prev = it
                continue
            if it.kind == "comment":
                b = banner(it.text)
                if b:
                    self.sections.append(b)
                    prev, prev_func = None, None
                    continue
            fn = function_of(it) if it.kind == "decl" else None
            if fn is None and it.kind == "decl" and \
                    it.text.startswith("CANCEL_API") and \
                    not re.search(r"\bcancel__\w*\s*\(", it.text):
                errors.append("%s:%d: cannot read this CANCEL_API declaration "
                              "(gen_man.py): %s" % (self.path, it.l0, it.text))
            adjacent = prev is not None and prev.l1 == it.l0 - 1
            if fn:
                f = Func(*fn, decl=it)
                if adjacent and prev.kind == "comment" and prev.standalone:
                    g = Group(prev, len(self.sections) - 1)
                    self.groups.append(g)
                elif adjacent and prev_func is not None:
                    g = prev_func.group
                else:
                    errors.append("%s:%d: %s has no contract comment above "
                                  "it" % (self.path, it.l0, f.name))
                    g = None
                if g:
                    f.group = g
                    g.funcs.append(f)
                    self.funcs.append(f)
                prev_func = f
            else:
                self.add_type(it, prev, adjacent)
                prev_func = None
            prev = it
        self.errors = errors

    def add_type(self, it, prev, adjacent):
        """Types and macros a user needs: each declaration or #define with
        a comment above it, and the uncommented ones right after it."""
        if it.kind == "comment":
            return
        name = type_name(it)
        if name is None:
            return
        if adjacent and prev.kind == "comment" and prev.standalone:
            self.types.append((comment_lines(prev.text), [it]))
        elif adjacent and self.types and self.types[-1][1][-1] is prev:
            self.types[-1][1].append(it)


def type_name(it):
    """The name a type or macro is known by, None for what is not one a
    user needs (include guards, conditionals, internals, functions)."""
    if it.kind == "pp":
        m = re.match(r"#\s*define\s+(\w+)", it.text)
        if not m or re.match(r"CANCEL(_\w+)?_H$", m.group(1)) or \
                m.group(1).startswith("CANCEL__") or m.group(1) == "CANCEL_API":
            return None
        return m.group(1)
    t = it.text
    if t.startswith("CANCEL_API") or t.startswith("static"):
        return None
    m = re.match(r"typedef\s+.*?\b(\w+)\s*\(", t)  # a function type
    if m and not re.match(r"typedef\s+(struct|enum|union)\b[^;]*\{", t):
        return m.group(1)
    m = re.search(r"\b(\w+)\s*;$", t)
    if t.startswith("typedef") and m:
        return m.group(1)
    m = re.match(r"(struct|enum|union)\s+(\w+)", t)
    if m:
        return None if "cancel__" in m.group(2) else m.group(1) + " " + m.group(2)
    m = re.match(r"enum\s*\{\s*(\w+)", t)
    if m:
        return m.group(1)
    return None


# ----------------------------------------------------------------------
# Writing mdoc
# ----------------------------------------------------------------------


def esc(s):
    """Text for a text line: backslashes escaped, a leading '.' or '\''
    protected."""
    s = s.replace("\\", "\\e")
    if s[:1] in (".", "'"):
        s = "\\&" + s
    return s


def q(s):
    """One quoted macro argument (never called as a macro)."""
    return '"' + s.replace("\\", "\\e").replace('"', "\\(dq") + '"'


END = re.compile(r"(?<!\.\.)(?<!\be\.g)(?<!\bi\.e)(?<!\betc)(?<!\bvs)(?<=\S)"
                 r"([.!?][\"')\]]*)\s+(?=\S)")


def sentences(text):
    """Prose as text lines: each sentence starts a line (mdoc's "new
    sentence, new line"), and lines are wrapped at 78 columns."""
    text = " ".join(text.split())
    out = []
    for sent in END.sub(lambda m: m.group(1) + "\n", text).split("\n"):
        line = ""
        for word in sent.split(" "):
            if line and len(line) + 1 + len(word) > 78:
                out.append(esc(line))
                line = word
            else:
                line = line + " " + word if line else word
        if line:
            out.append(esc(line))
    return out


def indent_of(ln):
    return len(ln) - len(ln.lstrip())


TAG = re.compile(r"^(\S.*?\S|\S)\s{2,}(\S.*)$")


def render(lines):
    """mdoc for comment text: paragraphs of prose, indented lines as a
    bullet list ("- "), a tag list ("value  text") or a literal display."""
    out = []
    paras, cur = [], []
    for ln in lines:
        if ln.strip():
            cur.append(ln)
        elif cur:
            paras.append(cur)
            cur = []
    if cur:
        paras.append(cur)
    for para in paras:
        k = 0
        prose = []
        while k < len(para):
            if indent_of(para[k]) == 0:
                prose.append(para[k].strip())
                k += 1
                continue
            blk = []
            while k < len(para) and indent_of(para[k]) > 0:
                blk.append(para[k])
                k += 1
            out.extend(sentences(" ".join(prose)) if prose else [])
            prose = []
            out.extend(render_block(blk))
        out.extend(sentences(" ".join(prose)) if prose else [])
        out.append(".Pp")
    while out and out[-1] == ".Pp":
        out.pop()
    # No paragraph break right before a list or display (mandoc skips it).
    cleaned = []
    for k, ln in enumerate(out):
        if ln == ".Pp" and (k + 1 < len(out) and
                            re.match(r"\.(Bl|Bd)\b", out[k + 1])):
            continue
        cleaned.append(ln)
    return cleaned


def render_block(blk):
    """An indented run of comment lines: a bullet list ("- " items), a tag
    list ("value  text" items), paragraphs with a hanging indent, or, for
    anything else (code above all), a literal display."""
    ind = min(indent_of(ln) for ln in blk)
    heads = [ln for ln in blk if indent_of(ln) == ind]
    if indent_of(blk[0]) != ind:
        heads = []  # it starts inside an item: show it as it is
    code = any(re.search(r"[;{}]\s*$|//| = |^\s*\.\.\.", ln) for ln in blk)
    if heads and all(ln.strip().startswith(("- ", "* ")) for ln in heads):
        return item_list(".Bl -bullet", blk, ind,
                         lambda ln: (".It", ln.strip()[2:]))
    if heads and all(TAG.match(ln.strip()) for ln in heads) and \
            not any(re.search(r"[{}]\s*$|//| = ", ln) for ln in heads):
        return item_list(".Bl -tag -width Ds", blk, ind,
                         lambda ln: (".It " + q(TAG.match(ln.strip()).group(1)),
                                     TAG.match(ln.strip()).group(2)))
    if heads and not code and all(re.match(r"^[A-Za-z(`\"]", ln.strip())
                                  for ln in heads):
        return item_list(".Bl -item -offset indent", blk, ind,
                         lambda ln: (".It", ln.strip()))
    out = [".Bd -literal -offset indent"]
    for ln in blk:
        out.append(esc(ln[ind:]) if ln.strip() else "")
    return out + [".Ed"]


def item_list(start, blk, ind, head):
    """A list whose items start at the lines indented by ind; head(line)
    gives an item's .It line and the start of its text, the more indented
    lines after it continue that text."""
    items = []
    for ln in blk:
        if indent_of(ln) == ind:
            macro, text = head(ln)
            items.append((macro, [text]))
        else:
            items[-1][1].append(ln.strip())
    out = [start]
    for macro, texts in items:
        out.append(macro)
        out.extend(sentences(" ".join(texts)))
    return out + [".El"]


def first_sentence(lines):
    """The first sentence of a comment's first paragraph, for NAME: cut at
    its first colon or semicolon when it is long."""
    prose = []
    for ln in lines:
        if not ln.strip() or (prose and indent_of(ln) > 0):
            break
        prose.append(ln.strip())
    text = " ".join(prose)
    m = END.search(text)
    s = text[:m.start() + 1] if m else text
    if len(s) > 90:
        depth = 0
        for k, ch in enumerate(s):
            depth += ch in "(["
            depth -= ch in ")]"
            if depth == 0 and k >= 20 and s[k:k + 2] in (": ", "; "):
                s = s[:k]
                break
    s = s.rstrip(" .:")
    if len(s) > 1 and s[0].isupper() and s[1].islower():
        s = s[0].lower() + s[1:]
    return s


ERRNO = re.compile(r"-(E[A-Z0-9]+)\b")
FALLBACK = {
    "ECANCELED": "The token fired (see the conventions in libcancel(7)).",
    "ETIMEDOUT": "The call's own deadline passed.",
}


def split_returns(lines):
    """(description, return values): the return values start at the first
    sentence that begins with "Returns"/"Return" and end with its
    paragraph."""
    for k, ln in enumerate(lines):
        m = re.search(r"(^|(?<=[.:;]\s)|(?<=\.\s\s))\s*Returns?\b", ln)
        if not m or indent_of(ln) > 0:
            continue
        if m.start() > 0 and not re.match(r"^\s*$", ln[:m.start()]) and \
                not re.search(r"[.:;]\s*$", ln[:m.start()]):
            continue
        end = k + 1
        while end < len(lines) and lines[end].strip():
            end += 1
        before = ln[:m.start()].rstrip()
        desc = lines[:k] + ([before] if before.strip() else []) + lines[end:]
        rv = [ln[m.start():].strip()] + lines[k + 1:end]
        return strip_blank(desc), rv
    return lines, []


def errors_of(lines):
    """[(ERRNO, explanation)] in the order the text names them."""
    found = {}
    order = []
    text_lines = [ln for ln in lines]
    for k, ln in enumerate(text_lines):
        for m in ERRNO.finditer(ln):
            code = m.group(1)
            if code not in order:
                order.append(code)
                found[code] = []
            rest = ln[m.end():]
            expl = None
            if rest.startswith(" ("):
                joined = " ".join(x.strip() for x in [rest] + text_lines[k + 1:])
                depth = 0
                for j, ch in enumerate(joined):
                    if ch == "(":
                        depth += 1
                    elif ch == ")":
                        depth -= 1
                        if depth == 0:
                            expl = joined[joined.find("(") + 1:j]
                            break
            else:
                tm = re.match(r"^((?:,\s*-E[A-Z0-9]+)*)\s{2,}(\S.*)$", rest)
                if tm and ln.strip().startswith("-E"):
                    ind = indent_of(ln)
                    parts = [tm.group(2)]
                    for ln2 in text_lines[k + 1:]:
                        if indent_of(ln2) <= ind or not ln2.strip():
                            break
                        parts.append(ln2.strip())
                    expl = " ".join(parts)
            if expl:
                expl = " ".join(expl.split()).rstrip(";,")
                if expl not in found[code]:
                    found[code].append(expl)
    res = []
    for code in order:
        if found[code]:
            text = "; ".join(found[code])
            if not text.endswith("."):
                text += "."
        elif code in FALLBACK:
            text = FALLBACK[code]
        else:
            num = getattr(errno, code, None)
            text = (os.strerror(num) + ".") if num else "See RETURN VALUES."
        res.append((code, text))
    return res


def mdoc_head(title, section, date, version):
    return [
        '.\\" Generated by man/gen_man.py from the headers: do not edit.',
        ".Dd " + date,
        ".Dt %s %s" % (title.upper(), section),
        ".Os libcancel %s" % version,
    ]


def library_lines(h):
    flags = " ".join(f.replace("-", "\\-") for f in h.link)
    return ["%s (%s; pkg-config module %s)" % (h.library, flags, h.pkgconfig)]


def synopsis(f):
    out = [".Ft " + q(f.rtype) if " " in f.rtype else ".Ft " + f.rtype,
           ".Fo " + f.name]
    params = f.params or ["void"]
    for p in params:
        # A function pointer's own parameters go as separate arguments:
        # the comma .Fo puts between them is the one the C has, and the
        # line can break there (one long argument cannot be broken).
        parts, depth, cur = [], 0, ""
        for ch in p:
            if ch == "," and depth == 1:
                parts.append(cur.strip())
                cur = ""
                continue
            depth += ch == "("
            depth -= ch == ")"
            cur += ch
        parts.append(cur.strip())
        for part in parts:
            out.append(".Fa " + q(part))
    out.append(".Fc")
    return out


def xrefs(pairs):
    pairs = sorted(set(pairs), key=lambda p: (p[1], p[0]))
    out = []
    for k, (name, sec) in enumerate(pairs):
        out.append(".Xr %s %s%s" % (name, sec, " ," if k + 1 < len(pairs) else ""))
    return out


def page3(h, g, all_funcs, date, version):
    first = g.funcs[0]
    out = mdoc_head(first.name, 3, date, version)
    out.append(".Sh NAME")
    for k, f in enumerate(g.funcs):
        out.append(".Nm " + f.name + (" ," if k + 1 < len(g.funcs) else ""))
    out.append(".Nd " + q(first_sentence(g.comment)))
    out.append(".Sh LIBRARY")
    out.extend(library_lines(h))
    out.append(".Sh SYNOPSIS")
    out.append(".In " + h.include)
    for f in g.funcs:
        out.extend(synopsis(f))
    desc, rv = split_returns(g.comment)
    out.append(".Sh DESCRIPTION")
    out.extend(render(desc) if desc else sentences(
        "See " + h.page + "(7)."))
    title, btext = h.sections[g.section]
    if btext:
        out.append(".Ss " + q(title))
        out.extend(render(btext))
    if any(f.inline for f in g.funcs):
        out.append(".Pp")
        out.extend(sentences("A static inline function of " + h.include +
                             ": it is not a symbol of the library."))
    errs = errors_of(rv if rv else g.comment)
    if not rv and not errs and h.common_returns:
        rv = h.common_returns
        errs = errors_of(rv)
    if rv:
        out.append(".Sh RETURN VALUES")
        out.extend(render(rv))
        if h.common_returns and rv is not h.common_returns:
            out.append(".Pp")
            out.extend(sentences("The return values shared by every function "
                                 "of " + h.include + " are in " + h.page +
                                 "(7)."))
    if errs:
        out.append(".Sh ERRORS")
        out.append(".Bl -tag -width Er")
        for code, text in errs:
            out.append(".It Bq Er " + code)
            out.extend(sentences(text))
        out.append(".El")
    names = {f.name for f in g.funcs}
    refs = {(h.page, 7)}
    text = " ".join(g.comment)
    for name in re.findall(r"\bcancel_\w+", text):
        if name in all_funcs and name not in names:
            refs.add((all_funcs[name].group.funcs[0].name, 3))
    for g2 in h.groups:
        if g2.section == g.section and g2 is not g and h.sections[g.section][0]:
            refs.add((g2.funcs[0].name, 3))
    out.append(".Sh SEE ALSO")
    out.extend(xrefs(refs))
    return out


def decl_display(items, comment):
    """The declarations of a type entry as written, unless private."""
    private = "private layout" in " ".join(comment).lower() or \
        "private:" in " ".join(comment).lower()
    out = [".Bd -literal -offset indent"]
    for it in items:
        raw = it.raw if it.kind == "decl" else it.text
        if private and it.kind == "decl" and "{" in raw:
            raw = raw[:raw.find("{")].rstrip() + " { /* private */ }" + \
                raw[raw.rfind("}") + 1:]
        for ln in raw.split("\n"):
            out.append(esc(ln.rstrip()) if ln.strip() else "")
    return out + [".Ed"]


def page7(h, headers, date, version):
    out = mdoc_head(h.page, 7, date, version)
    out.append(".Sh NAME")
    out.append(".Nm " + h.page)
    top_first = first_sentence(h.top)
    m = re.match(r"^[\w -]{1,20}:\s+(.*)$", top_first)
    out.append(".Nd " + q(m.group(1) if m else top_first))
    out.append(".Sh SYNOPSIS")
    out.append(".In " + h.include)
    out.append(".Pp")
    out.extend(library_lines(h))
    out.append(".Sh DESCRIPTION")
    out.extend(render(h.top))
    for title, btext in h.sections[1:]:
        if btext:
            out.append(".Ss " + q(title))
            out.extend(render(btext))
    out.append(".Sh FUNCTIONS")
    for si, (title, _) in enumerate(h.sections):
        groups = [g for g in h.groups if g.section == si]
        if not groups:
            continue
        if title:
            out.append(".Ss " + q(title))
        out.append(".Bl -tag -width Ds")
        for g in groups:
            for f in g.funcs:
                out.append(".It Xr " + f.name + " 3")
            out.extend(sentences(first_sentence(g.comment) + "."))
        out.append(".El")
    if h.types:
        out.append(".Sh TYPES AND MACROS")
        out.append(".Bl -tag -width Ds")
        for comment, items in h.types:
            for it in items:
                out.append(".It Vt " + q(type_name(it)))
            out.extend(render(comment))
            out.extend(decl_display(items, comment))
        out.append(".El")
    if h.include == "cancel.h":
        out.append(".Sh HEADERS")
        out.append(".Bl -tag -width Ds")
        for h2 in headers:
            out.append(".It In " + h2.include)
            out.append(".Xr " + h2.page + " 7" if h2 is not h else "this page")
        out.append(".El")
    out.append(".Sh SEE ALSO")
    out.extend(xrefs([(h2.page, 7) for h2 in headers if h2 is not h]))
    return out


def write(path, lines):
    text = "\n".join(lines) + "\n"
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return  # unchanged: keep the timestamp
    except OSError:
        pass
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv):
    if len(argv) < 3:
        raise SystemExit("usage: gen_man.py OUTDIR HEADER...")
    outdir = argv[1]
    headers = [Header(p) for p in argv[2:]]
    errors = [e for h in headers for e in h.errors]
    if errors:
        raise SystemExit("\n".join(errors) + "\ngen_man.py: every public "
                         "function needs the contract comment above its "
                         "prototype (see STYLE.md)")
    headers.sort(key=lambda h: (h.include != "cancel.h", h.include))
    version = next((h.version for h in headers if h.version), "unknown")
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = int(epoch) if epoch else max(int(os.path.getmtime(h.path))
                                        for h in headers)
    t = time.gmtime(when)
    date = "%s %d, %d" % (time.strftime("%B", t), t.tm_mday, t.tm_year)
    all_funcs = {}
    for h in headers:
        for f in h.funcs:
            if f.name in all_funcs:
                raise SystemExit("%s: %s is declared twice" % (h.path, f.name))
            all_funcs[f.name] = f
    man3 = os.path.join(outdir, "man3")
    man7 = os.path.join(outdir, "man7")
    os.makedirs(man3, exist_ok=True)
    os.makedirs(man7, exist_ok=True)
    want3 = {f + ".3" for f in all_funcs}
    want7 = {h.page + ".7" for h in headers}
    for d, want in ((man3, want3), (man7, want7)):
        for name in os.listdir(d):
            if name not in want:
                os.remove(os.path.join(d, name))
    for h in headers:
        write(os.path.join(man7, h.page + ".7"), page7(h, headers, date, version))
        for g in h.groups:
            first = g.funcs[0].name + ".3"
            write(os.path.join(man3, first),
                  page3(h, g, all_funcs, date, version))
            for f in g.funcs[1:]:
                link = os.path.join(man3, f.name + ".3")
                if os.path.islink(link) and os.readlink(link) == first:
                    continue
                if os.path.lexists(link):
                    os.remove(link)
                os.symlink(first, link)
    print("gen_man.py: %d pages in man3 (%d functions), %d in man7"
          % (sum(len(h.groups) for h in headers), len(all_funcs), len(headers)))


if __name__ == "__main__":
    main(sys.argv)
