// Test helper (tests/test_app_lungs.py): the page's lung outline (src/lungs.js) under node.
// argv[2]: a JSON list of {file, size, threshold}; each file holds float32 probabilities
// (row-major, little-endian). Prints, per item, the rings (points), their areas and the stats.
import { readFileSync } from "node:fs";
import { lungRings, lungStats, ringArea, ringsPath } from "../src/lungs.js";

const items = JSON.parse(readFileSync(process.argv[2], "utf8"));
const out = items.map(({ file, size, threshold }) => {
  const buf = readFileSync(file);
  const prob = new Float32Array(buf.buffer, buf.byteOffset, size * size);
  const rings = lungRings(prob, size, threshold);
  return { rings, areas: rings.map(ringArea), stats: lungStats(prob, size, threshold), path: ringsPath(rings) };
});
process.stdout.write(JSON.stringify(out));
