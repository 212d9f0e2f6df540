// DICOM radiographs to 8-bit grey pixels, step for step as the pipeline does it
// (covid_data/dicom.py): stored values (masked to Bits Stored, sign-extended) ->
// Modality LUT (sequence, else Rescale Slope/Intercept) -> VOI (VOI LUT sequence,
// else the first Window Center/Width with LINEAR / LINEAR_EXACT / SIGMOID, else the
// frame's min-max) -> 0..255 in float64, rounded half to even -> MONOCHROME1
// inverted. The first frame of a multi-frame image is read.
// Nothing is sent anywhere and no patient attribute is read: only the image pixel
// module (group 0028), the pixel data and the transfer syntax.
import dicomParser from "dicom-parser";
import { Decoder as LosslessDecoder } from "jpeg-lossless-decoder-js";
import OpenJPEGWASM from "@cornerstonejs/codec-openjpeg/decodewasmjs";
// Transfer syntax names: one table for the page and the pipeline (covid_data/dicom.py reads it too).
import TRANSFER_SYNTAXES from "../../covid_data/transfer_syntaxes.json";

const NATIVE = new Set(["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"]);
const J2K = new Set(["1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"]);
const LOSSLESS = new Set(["1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"]);
const RLE = "1.2.840.10008.1.2.5";

/** Thrown for a DICOM file the page cannot turn into pixels; `message` says why. */
export class DicomError extends Error {}

export function transferSyntaxName(uid) {
  return `${TRANSFER_SYNTAXES[uid] || "an unknown transfer syntax"} (${uid})`;
}

/** Part 10 ("DICM" after the preamble), or a bare dataset starting with a group 0008 element. */
export function isDicom(bytes) {
  if (bytes.length >= 132 && bytes[128] === 0x44 && bytes[129] === 0x49 && bytes[130] === 0x43 && bytes[131] === 0x4d) return true;
  return bytes.length >= 8 && bytes[0] === 0x08 && bytes[1] === 0x00 && bytes[3] === 0 && [0x00, 0x05, 0x08, 0x16].includes(bytes[2]);
}

// Where the OpenJPEG wasm file is, relative to the page (build.mjs copies it to dist/codecs/).
let codecBase = "./codecs/";
let openjpeg = null;
export function setCodecBase(url) {
  codecBase = url;
  openjpeg = null;
}

function roundHalfEven(v) {
  const fl = Math.floor(v);
  const d = v - fl;
  if (d < 0.5) return fl;
  if (d > 0.5) return fl + 1;
  return fl % 2 === 0 ? fl : fl + 1;
}

/** Parse the header: the image pixel attributes and the transfer syntax. */
export function parseDicom(bytes) {
  let ds;
  const part10 = bytes.length >= 132 && bytes[128] === 0x44 && bytes[129] === 0x49;
  try {
    // A file without the file meta header is an Implicit VR Little Endian dataset (as pydicom reads it).
    ds = part10 ? dicomParser.parseDicom(bytes) : dicomParser.parseDicom(bytes, { TransferSyntaxUID: "1.2.840.10008.1.2" });
  } catch (e) {
    throw new DicomError(`This DICOM file could not be read (${(e && e.message) || e}).`);
  }
  const ts = (ds.string("x00020010") || "1.2.840.10008.1.2").replace(/\0/g, "").trim();
  const num = (tag) => ds.uint16(tag);
  const info = {
    ds,
    ts,
    rows: num("x00280010"),
    columns: num("x00280011"),
    samples: num("x00280002") ?? 1,
    photometric: (ds.string("x00280004") || "").trim(),
    bitsAllocated: num("x00280100"),
    bitsStored: num("x00280101") ?? num("x00280100"),
    signed: num("x00280103") === 1,
    bigEndian: ts === "1.2.840.10008.1.2.2",
  };
  return info;
}

/** Check what the page can read; throws DicomError naming what it cannot. */
export function checkReadable(info) {
  const { ts, photometric, samples, bitsAllocated, bitsStored } = info;
  if (!info.ds.elements.x7fe00010) throw new DicomError("This DICOM file has no image (no Pixel Data).");
  if (!(info.rows > 0 && info.columns > 0)) throw new DicomError("This DICOM file has no image size (Rows/Columns).");
  if (samples !== 1 || (photometric !== "MONOCHROME1" && photometric !== "MONOCHROME2")) {
    throw new DicomError(
      `This DICOM image is ${photometric || "of unknown photometric interpretation"} with ${samples} samples per pixel; only grayscale (MONOCHROME1/MONOCHROME2) radiographs are read.`,
    );
  }
  if ((bitsAllocated !== 8 && bitsAllocated !== 16) || !(bitsStored >= 1 && bitsStored <= bitsAllocated)) {
    throw new DicomError(`This DICOM image has ${bitsStored} bits stored in ${bitsAllocated} allocated; the app reads 8 or 16 allocated.`);
  }
  if (!NATIVE.has(ts) && !J2K.has(ts) && !LOSSLESS.has(ts) && ts !== RLE) {
    throw new DicomError(
      `This DICOM file's pixel data is compressed as ${transferSyntaxName(ts)}, which this app cannot decode. It reads uncompressed, JPEG 2000, JPEG Lossless and RLE DICOM; export the image uncompressed or as PNG.`,
    );
  }
}

function firstFrameBytes(info) {
  const { ds } = info;
  const el = ds.elements.x7fe00010;
  if (NATIVE.has(info.ts)) {
    const frame = info.rows * info.columns * (info.bitsAllocated / 8);
    if (el.length < frame) throw new DicomError(`This DICOM file's pixel data is too short (${el.length} bytes for ${info.columns} x ${info.rows}).`);
    return new Uint8Array(ds.byteArray.buffer, ds.byteArray.byteOffset + el.dataOffset, frame);
  }
  if (!el.encapsulatedPixelData) throw new DicomError(`This DICOM file's compressed pixel data (${transferSyntaxName(info.ts)}) is not encapsulated.`);
  const frames = Number(ds.intString("x00280008") || 1);
  if (frames <= 1 || !el.basicOffsetTable || el.basicOffsetTable.length === 0) {
    // One frame: every fragment belongs to it (a multi-frame file without an offset table: the first fragment).
    const n = frames <= 1 ? el.fragments.length : 1;
    return dicomParser.readEncapsulatedPixelDataFromFragments(ds, el, 0, n);
  }
  return dicomParser.readEncapsulatedImageFrame(ds, el, 0);
}

async function decodeJ2k(data) {
  if (!openjpeg) {
    const base = new URL(codecBase, typeof document !== "undefined" ? document.baseURI : self.location.href);
    // Quiet: OpenJPEG logs each header it reads.
    openjpeg = OpenJPEGWASM({ locateFile: (f) => new URL(f, base).href, print: () => {}, printErr: () => {} });
  }
  let lib;
  try {
    lib = await openjpeg;
  } catch (e) {
    openjpeg = null;
    throw new DicomError(`The JPEG 2000 decoder could not be loaded (${(e && e.message) || e}).`);
  }
  const dec = new lib.J2KDecoder();
  try {
    dec.getEncodedBuffer(data.length).set(data);
    dec.decode();
    const fi = dec.getFrameInfo();
    const buf = dec.getDecodedBuffer();
    const n = fi.width * fi.height;
    let values;
    if (fi.bitsPerSample > 8) {
      const copy = new Uint8Array(buf).slice(0, n * 2);
      values = fi.isSigned ? new Int16Array(copy.buffer) : new Uint16Array(copy.buffer);
    } else {
      const copy = new Uint8Array(buf).slice(0, n);
      values = fi.isSigned ? new Int8Array(copy.buffer) : copy;
    }
    return { values, width: fi.width, height: fi.height, components: fi.componentCount };
  } finally {
    dec.delete && dec.delete();
  }
}

function decodeRle(data, info) {
  // DICOM RLE (PS3.5 Annex G): a 64-byte header of segment offsets, one PackBits segment per byte plane,
  // most significant byte first.
  const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const segments = dv.getUint32(0, true);
  const bytesPer = info.bitsAllocated / 8;
  if (segments !== bytesPer) throw new DicomError(`This RLE DICOM image has ${segments} segments, ${bytesPer} expected for one grayscale sample.`);
  const n = info.rows * info.columns;
  const out = new Uint8Array(n * bytesPer);
  for (let s = 0; s < segments; s++) {
    let p = dv.getUint32(4 + 4 * s, true);
    const end = s + 1 < segments ? dv.getUint32(8 + 4 * s, true) : data.length;
    const shift = bytesPer - 1 - s; // byte plane s holds the (bytesPer-1-s)th byte, little-endian output
    let i = 0;
    while (p < end && i < n) {
      const h = data[p++];
      if (h < 128) {
        for (let k = 0; k <= h && i < n; k++) out[i++ * bytesPer + shift] = data[p++];
      } else if (h > 128) {
        const v = data[p++];
        for (let k = 0; k < 257 - h && i < n; k++) out[i++ * bytesPer + shift] = v;
      }
    }
  }
  return out;
}

/** The first frame's stored values as a Float64Array (mirrors covid_data.dicom.stored_values). */
export async function storedValues(info) {
  const n = info.rows * info.columns;
  const out = new Float64Array(n);
  const data = firstFrameBytes(info);
  if (NATIVE.has(info.ts) || info.ts === RLE) {
    const raw = info.ts === RLE ? decodeRle(data, info) : data;
    const mask = info.bitsStored >= 32 ? 0xffffffff : (1 << info.bitsStored) - 1;
    const half = 1 << (info.bitsStored - 1);
    const full = 2 ** info.bitsStored;
    const dv = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
    const little = info.ts === RLE ? true : !info.bigEndian;
    for (let i = 0; i < n; i++) {
      let v = info.bitsAllocated === 8 ? raw[i] : dv.getUint16(2 * i, little);
      v &= mask; // bits above High Bit may hold overlays
      if (info.signed && v >= half) v -= full;
      out[i] = v;
    }
    return out;
  }
  let values;
  let width;
  let height;
  try {
    if (J2K.has(info.ts)) {
      const r = await decodeJ2k(data);
      if (r.components !== 1) throw new DicomError(`This JPEG 2000 DICOM image has ${r.components} components; one expected.`);
      ({ values, width, height } = r);
    } else {
      values = new LosslessDecoder().decode(data.buffer, data.byteOffset, data.byteLength);
      width = info.columns;
      height = info.rows;
      if (info.signed && info.bitsAllocated === 16) values = new Int16Array(values.buffer, values.byteOffset, values.length);
    }
  } catch (e) {
    if (e instanceof DicomError) throw e;
    throw new DicomError(`This DICOM file's pixel data (${transferSyntaxName(info.ts)}) does not decode (${(e && e.message) || e}).`);
  }
  if (width !== info.columns || height !== info.rows || values.length < n) {
    throw new DicomError(`This DICOM file's decoded image is ${width} x ${height}, its header says ${info.columns} x ${info.rows}.`);
  }
  for (let i = 0; i < n; i++) out[i] = values[i];
  return out;
}

function lut(ds, seqTag, what, signed) {
  const seq = ds.elements[seqTag];
  if (!seq || !seq.items || seq.items.length === 0) return null;
  const item = seq.items[0].dataSet;
  const desc = item.elements.x00283002;
  const data = item.elements.x00283006;
  if (!desc || !data || desc.length !== 6) throw new DicomError(`This DICOM file's ${what} LUT has no LUT Descriptor or LUT Data.`);
  const n = item.uint16("x00283002", 0) || 65536;
  let first = item.uint16("x00283002", 1);
  if (signed && first >= 32768) first -= 65536;
  const bits = item.uint16("x00283002", 2);
  if (!(bits >= 8 && bits <= 16)) throw new DicomError(`This DICOM file's ${what} LUT has ${bits} bits per entry (8 to 16 expected).`);
  if (data.length / 2 < n) throw new DicomError(`This DICOM file's ${what} LUT has ${data.length / 2} entries, its descriptor says ${n}.`);
  const values = new Float64Array(n);
  for (let i = 0; i < n; i++) values[i] = item.uint16("x00283006", i);
  return { n, first, bits, values };
}

function applyLut(x, t) {
  for (let i = 0; i < x.length; i++) {
    const idx = Math.min(Math.max(roundHalfEven(x[i]) - t.first, 0), t.n - 1);
    x[i] = t.values[idx];
  }
  return x;
}

/** Modality LUT in place (mirrors covid_data.dicom.modality). */
export function modality(info, x) {
  const { ds } = info;
  const t = lut(ds, "x00283000", "Modality", info.signed);
  if (t) return applyLut(x, t);
  const hasSlope = ds.elements.x00281053 !== undefined;
  const hasIntercept = ds.elements.x00281052 !== undefined;
  if (hasSlope || hasIntercept) {
    const s = hasSlope ? ds.floatString("x00281053", 0) : 1;
    const b = hasIntercept ? ds.floatString("x00281052", 0) : 0;
    for (let i = 0; i < x.length; i++) x[i] = x[i] * s + b;
  }
  return x;
}

/** VOI to 0..255 in place, float64, not rounded (mirrors covid_data.dicom.voi). */
export function voi(info, x) {
  const { ds } = info;
  const t = lut(ds, "x00283010", "VOI", false);
  if (t) {
    applyLut(x, t);
    const top = (1 << t.bits) - 1;
    for (let i = 0; i < x.length; i++) x[i] = (x[i] / top) * 255;
    return x;
  }
  const c = ds.elements.x00281050 ? ds.floatString("x00281050", 0) : undefined;
  const w = ds.elements.x00281051 ? ds.floatString("x00281051", 0) : undefined;
  const fn = ((ds.string("x00281056") || "LINEAR").trim().toUpperCase()) || "LINEAR";
  if (Number.isFinite(c) && Number.isFinite(w)) {
    if (fn === "SIGMOID" && w > 0) {
      for (let i = 0; i < x.length; i++) x[i] = 255 / (1 + Math.exp((-4 * (x[i] - c)) / w));
      return x;
    }
    if (fn === "LINEAR_EXACT" && w > 0) {
      const lo = c - w / 2;
      const hi = c + w / 2;
      for (let i = 0; i < x.length; i++) {
        const v = x[i];
        x[i] = v <= lo ? 0 : v > hi ? 255 : ((v - c) / w + 0.5) * 255;
      }
      return x;
    }
    if (fn === "LINEAR" && w >= 1) {
      const lo = c - 0.5 - (w - 1) / 2;
      const hi = c - 0.5 + (w - 1) / 2;
      for (let i = 0; i < x.length; i++) {
        const v = x[i];
        x[i] = v <= lo ? 0 : v > hi ? 255 : ((v - (c - 0.5)) / (w - 1) + 0.5) * 255;
      }
      return x;
    }
  }
  let lo = Infinity;
  let hi = -Infinity;
  for (let i = 0; i < x.length; i++) {
    if (x[i] < lo) lo = x[i];
    if (x[i] > hi) hi = x[i];
  }
  if (!(hi > lo)) return x.fill(0);
  for (let i = 0; i < x.length; i++) x[i] = ((x[i] - lo) / (hi - lo)) * 255;
  return x;
}

/** Grey uint8 pixels of a parsed, readable DICOM: {grey, width, height}. */
export async function dicomGrey(info) {
  checkReadable(info);
  const x = voi(info, modality(info, await storedValues(info)));
  const grey = new Uint8Array(x.length);
  const invert = info.photometric === "MONOCHROME1";
  for (let i = 0; i < x.length; i++) {
    const v = Math.min(255, Math.max(0, roundHalfEven(x[i])));
    grey[i] = invert ? 255 - v : v;
  }
  return { grey, width: info.columns, height: info.rows };
}
