// The lung outline: the run's lung segmenter (a small U-Net: the picked image at its input size,
// grey, raw 0-255 as the classifiers get it; each pixel's lung probability out) and the contour of
// its probabilities at the threshold, traced by marching squares with linear interpolation, as
// scikit-image's measure.find_contours does (fully_connected="low": at a saddle the two lung
// corners stay apart), so that the page and Python draw the same line. No DOM here.

/**
 * Closed rings (each a list of [x, y] in the grid's units: pixel i spans [i, i + 1], its centre at
 * i + 0.5) where the probability grid crosses `threshold`. The grid is padded with zeros, so a lung
 * that touches the image's edge still gives a closed ring.
 * @param {ArrayLike<number>} prob row-major, size*size
 * @param {number} size
 * @param {number} threshold
 * @returns {number[][][]}
 */
export function lungRings(prob, size, threshold = 0.5) {
  const n = size + 2; // padded side
  const v = new Float64Array(n * n);
  for (let r = 0; r < size; r++) for (let c = 0; c < size; c++) v[(r + 1) * n + c + 1] = prob[r * size + c];
  const at = (r, c) => v[r * n + c];
  // A crossing on the edge between two grid points, keyed by the pair; its point in padded units.
  const point = (r0, c0, r1, c1) => {
    const a = at(r0, c0), b = at(r1, c1);
    const t = (threshold - a) / (b - a);
    return [c0 + t * (c1 - c0), r0 + t * (r1 - r0)];
  };
  const edgeKey = (r0, c0, r1, c1) => (r1 > r0 ? `v${r0},${c0}` : `h${r0},${c0}`);
  const segments = []; // [keyA, pointA, keyB, pointB]
  for (let r = 0; r < n - 1; r++) {
    for (let c = 0; c < n - 1; c++) {
      const tl = at(r, c) > threshold, tr = at(r, c + 1) > threshold;
      const bl = at(r + 1, c) > threshold, br = at(r + 1, c + 1) > threshold;
      const code = (tl ? 8 : 0) | (tr ? 4 : 0) | (br ? 2 : 0) | (bl ? 1 : 0);
      if (code === 0 || code === 15) continue;
      const top = () => [edgeKey(r, c, r, c + 1), point(r, c, r, c + 1)];
      const bottom = () => [edgeKey(r + 1, c, r + 1, c + 1), point(r + 1, c, r + 1, c + 1)];
      const left = () => [edgeKey(r, c, r + 1, c), point(r, c, r + 1, c)];
      const right = () => [edgeKey(r, c + 1, r + 1, c + 1), point(r, c + 1, r + 1, c + 1)];
      const add = (a, b) => segments.push([...a, ...b]);
      switch (code) {
        case 1: case 14: add(left(), bottom()); break;
        case 2: case 13: add(bottom(), right()); break;
        case 3: case 12: add(left(), right()); break;
        case 4: case 11: add(top(), right()); break;
        case 6: case 9: add(top(), bottom()); break;
        case 7: case 8: add(left(), top()); break;
        // Saddles: the two lung corners stay apart (scikit-image's fully_connected="low").
        case 5: add(top(), right()); add(left(), bottom()); break; // tr and bl are lung: a cut round each
        case 10: add(left(), top()); add(bottom(), right()); break; // tl and br are lung
      }
    }
  }
  // Each crossing is shared by exactly two segments of a closed contour: walk them into rings.
  const byEdge = new Map();
  segments.forEach((s, i) => {
    for (const k of [s[0], s[2]]) {
      if (!byEdge.has(k)) byEdge.set(k, []);
      byEdge.get(k).push(i);
    }
  });
  const used = new Uint8Array(segments.length);
  const rings = [];
  for (let start = 0; start < segments.length; start++) {
    if (used[start]) continue;
    used[start] = 1;
    const [k0, p0, k1, p1] = segments[start];
    const ring = [p0, p1];
    let key = k1;
    while (key !== k0) {
      const next = byEdge.get(key).find((i) => !used[i]);
      if (next === undefined) break; // cannot happen on a padded grid
      used[next] = 1;
      const s = segments[next];
      const [, pNext, keyNext] = s[0] === key ? [s[0], s[3], s[2]] : [s[2], s[1], s[0]];
      ring.push(pNext);
      key = keyNext;
    }
    ring.pop(); // the last point is the first again
    // From padded units to the image grid's: minus the pad, plus half a pixel (points are pixel centres).
    rings.push(ring.map(([x, y]) => [x - 0.5, y - 0.5]));
  }
  return rings;
}

/** A ring's enclosed area (shoelace), in squared grid units. */
export function ringArea(ring) {
  let a = 0;
  for (let i = 0; i < ring.length; i++) {
    const [x0, y0] = ring[i];
    const [x1, y1] = ring[(i + 1) % ring.length];
    a += x0 * y1 - x1 * y0;
  }
  return Math.abs(a) / 2;
}

/** An SVG path of the rings, in the grid's units (a viewBox "0 0 size size"), to 2 decimals. */
export function ringsPath(rings) {
  return rings
    .map((ring) => "M" + ring.map(([x, y]) => `${x.toFixed(2)} ${y.toFixed(2)}`).join("L") + "Z")
    .join("");
}

/**
 * What the outline says: the share of the image that is lung (pixels over the threshold), and the
 * lung found in each half of the picture (image left, image right: the patient's right and left lung
 * on a frontal film), each as a share of the image.
 */
export function lungStats(prob, size, threshold = 0.5) {
  let left = 0, right = 0;
  const half = size / 2;
  for (let r = 0; r < size; r++) {
    for (let c = 0; c < size; c++) {
      if (prob[r * size + c] > threshold) {
        if (c + 0.5 < half) left++;
        else right++;
      }
    }
  }
  const all = size * size;
  return { share: (left + right) / all, left: left / all, right: right / all };
}
