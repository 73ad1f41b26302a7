"""Episode videos (MP4 through the system ffmpeg), contact sheets and the success bar chart.

Every video frame and contact-sheet tile carries a caption: the task and instruction, the step,
and the outcome (SUCCESS at step s once it fired, FAILED on the last frame of a failed episode).
"""

import json
import subprocess
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _caption(frame, label, step, total, success_step, width=None):
    """The frame with a caption band under it."""
    h, w = frame.shape[:2]
    size = max(10, w // 22)
    band = 3 * size + 10
    img = Image.new("RGB", (w, h + band), (20, 20, 20))
    img.paste(Image.fromarray(frame), (0, 0))
    d = ImageDraw.Draw(img)
    f = _font(size)
    text = label
    while d.textlength(text, font=f) > w - 6 and len(text) > 4:
        text = text[:-4] + "..."
    d.text((3, h + 2), text, fill=(230, 230, 230), font=f)
    if success_step is not None and step >= success_step:
        status, color = f"step {step}  SUCCESS at step {success_step}", (80, 220, 80)
    elif step == total and success_step is None:
        status, color = f"step {step}  FAILED", (240, 80, 80)
    else:
        status, color = f"step {step}", (230, 230, 230)
    d.text((3, h + 4 + size), status, fill=color, font=f)
    return np.asarray(img)


def write_mp4(frames, path, fps=80, label="", success_step=None):
    """Encodes frames (H x W x 3 uint8) with captions to an H.264 MP4 with ffmpeg."""
    total = len(frames)
    first = _caption(frames[0], label, 1, total, success_step)
    h, w = first.shape[:2]
    cmd = ["ffmpeg", "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
           "-r", str(fps), "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "23",
           "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", str(path)]
    try:
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as e:
        raise RuntimeError(f"cannot run ffmpeg ({e}); install it (tools/setup.sh does)") from e
    try:
        for i, fr in enumerate(frames):
            img = first if i == 0 else _caption(fr, label, i + 1, total, success_step)
            p.stdin.write(img.tobytes())
        p.stdin.close()
    except BrokenPipeError:
        pass
    err = p.stderr.read().decode(errors="replace")
    if p.wait() != 0:
        raise RuntimeError(f"ffmpeg failed writing {path}: {err[-500:]}")


def contact_sheet(frames, path, label="", success_step=None, tiles=8, columns=4):
    """A PNG grid of `tiles` frames evenly spread over the episode (always the last one)."""
    total = len(frames)
    idx = sorted(set(np.linspace(0, total - 1, min(tiles, total)).round().astype(int).tolist()))
    imgs = [_caption(frames[i], label, i + 1, total, success_step) for i in idx]
    h, w = imgs[0].shape[:2]
    rows = (len(imgs) + columns - 1) // columns
    sheet = Image.new("RGB", (w * min(columns, len(imgs)), h * rows), (0, 0, 0))
    for k, im in enumerate(imgs):
        sheet.paste(Image.fromarray(im), ((k % columns) * w, (k // columns) * h))
    sheet.save(path)


def bar_chart(results_json, path):
    """Success rate per task as a horizontal bar chart with 95% Wilson intervals (PNG)."""
    r = json.loads(open(results_json).read())
    tasks = r["tasks"]
    names = sorted(tasks)
    row_h, left, width = 18, 230, 420
    top = 30
    img = Image.new("RGB", (left + width + 70, top + row_h * len(names) + 30), (255, 255, 255))
    d = ImageDraw.Draw(img)
    f = _font(12)
    d.text((5, 5), f"success per task ({r.get('policy', {}).get('kind', '')}, {r['config'].get('protocol', '')})",
           fill=(0, 0, 0), font=f)
    for i, name in enumerate(names):
        t = tasks[name]
        y = top + i * row_h
        rate = t["success_rate"] if t["episodes"] else 0.0
        d.text((5, y + 2), name, fill=(0, 0, 0), font=f)
        d.rectangle([left, y + 3, left + int(rate * width), y + row_h - 3], fill=(70, 130, 200))
        lo, hi = t.get("wilson95", [rate, rate])
        d.line([left + int(lo * width), y + row_h // 2, left + int(hi * width), y + row_h // 2], fill=(0, 0, 0))
        d.text((left + width + 5, y + 2), f"{100 * rate:.0f}% ({t['successes']}/{t['episodes']})", fill=(0, 0, 0), font=f)
    y = top + row_h * len(names) + 5
    for k in range(0, 101, 25):
        x = left + width * k // 100
        d.line([x, top, x, y], fill=(200, 200, 200))
        d.text((x - 8, y + 2), f"{k}%", fill=(90, 90, 90), font=f)
    img.save(path)


if __name__ == "__main__":
    # python -m openvla_sim.media chart RESULTS_JSON OUT_PNG
    if len(sys.argv) == 4 and sys.argv[1] == "chart":
        bar_chart(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m openvla_sim.media chart RESULTS_JSON OUT_PNG")
