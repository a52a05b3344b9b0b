"""A flame graph as SVG from collapsed stacks (``a;b;c 12`` per line, py-spy's ``raw`` format).

Brendan Gregg's layout: the root at the bottom, callees above their callers, each frame as
wide as its share of the samples; frames are coloured by the layer their code belongs to
(``color_of``), and each one's tooltip gives its samples and share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from html import escape

WIDTH, ROW, TOP, MIN_WIDTH = 1400, 16, 74, 1.0  # pixels; narrower frames are not drawn


@dataclass
class Frame:
    name: str
    samples: int = 0
    children: dict[str, Frame] = field(default_factory=dict)


def tree(stacks: dict[tuple[str, ...], int]) -> Frame:
    root = Frame("all")
    for stack, count in stacks.items():
        node = root
        node.samples += count
        for name in stack:
            node = node.children.setdefault(name, Frame(name))
            node.samples += count
    return root


def depth(frame: Frame) -> int:
    return 1 + max((depth(child) for child in frame.children.values()), default=0)


def render(stacks: dict[tuple[str, ...], int], title: str, color_of: Callable[[str], str],
           legend: dict[str, str]) -> str:  # fmt: skip
    """The SVG document; ``legend`` maps each layer's name to its colour."""
    root = tree(stacks)
    rows = depth(root)
    height = TOP + rows * ROW + 8
    scale = WIDTH / max(1, root.samples)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="monospace" '
        f'font-size="11">',
        f'<rect width="{WIDTH}" height="{height}" fill="#fbfbf8"/>',
        f'<text x="4" y="16" font-size="14">{escape(title)} ({root.samples} samples)</text>',
    ]
    x, y = 4.0, 26
    for name, colour in legend.items():
        if x + 24 + 7 * len(name) > WIDTH:
            x, y = 4.0, y + 18
        out.append(f'<rect x="{x:.0f}" y="{y}" width="12" height="12" fill="{colour}"/>')
        out.append(f'<text x="{x + 16:.0f}" y="{y + 10}">{escape(name)}</text>')
        x += 24 + 7 * len(name)

    def draw(frame: Frame, left: float, level: int) -> None:
        width = frame.samples * scale
        if width < MIN_WIDTH:
            return
        y = height - 8 - (level + 1) * ROW
        share = 100 * frame.samples / max(1, root.samples)
        label = escape(f"{frame.name} ({frame.samples} samples, {share:.1f}%)")
        colour = "#d8d8d0" if level == 0 else color_of(frame.name)
        out.append(f'<g><title>{label}</title><rect x="{left:.2f}" y="{y}" width="{width:.2f}" height="{ROW - 1}" '
                   f'fill="{colour}" rx="1"/>')  # fmt: skip
        chars = int((width - 4) / 6.6)
        if chars >= 4:
            text = frame.name if len(frame.name) <= chars else frame.name[: chars - 2] + ".."
            out.append(f'<text x="{left + 2:.2f}" y="{y + ROW - 4}">{escape(text)}</text>')
        out.append("</g>")
        offset = left
        for child in sorted(frame.children.values(), key=lambda c: c.name):
            draw(child, offset, level + 1)
            offset += child.samples * scale

    draw(root, 0.0, 0)
    out.append("</svg>")
    return "\n".join(out) + "\n"
