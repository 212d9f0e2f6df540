// Test helper (tests/test_app_view.py): the page's preprocessing and view check under node.
// argv[2]: a JSON list of {file, width, height, size}; each file holds grey uint8 pixels
// (row-major), spread to RGBA as the page holds a decoded picture. Prints, per item, the
// 128 px input's bytes (base64) and the cues; JSON numbers round-trip exactly.
import { readFileSync } from "node:fs";
import { preprocess } from "../src/preprocess.js";
import { viewCues } from "../src/view.js";

const items = JSON.parse(readFileSync(process.argv[2], "utf8"));
const out = items.map(({ file, width, height }) => {
  const grey = readFileSync(file);
  const rgba = new Uint8ClampedArray(width * height * 4);
  for (let i = 0; i < width * height; i++) {
    rgba[4 * i] = rgba[4 * i + 1] = rgba[4 * i + 2] = grey[i];
    rgba[4 * i + 3] = 255;
  }
  const input = preprocess(rgba, width, height, 128, 1);
  const c = viewCues(input);
  return { input: Buffer.from(Uint8Array.from(input)).toString("base64"), asymmetry: String(c.asymmetry), midline: String(c.midline) };
});
process.stdout.write(JSON.stringify(out));
