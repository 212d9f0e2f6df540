// Reading a picked file: validate the bytes (type, dimensions) BEFORE decoding,
// then decode to RGBA without colour-space conversion or premultiplication.
// PNG and JPEG are decoded by the browser, a JPEG turned upright by its EXIF
// orientation (as covid_data.imaging does); DICOM by src/dicom.js (as
// covid_data.dicom does) into grey RGBA (R = G = B).
import { imageSize } from "image-size";
import { DicomError, dicomGrey, isDicom, parseDicom } from "./dicom.js";

export const MAX_SIDE = 8192;
export const MAX_PIXELS = 40_000_000;

export class AppError extends Error {
  constructor(kind, message) {
    super(message);
    this.kind = kind;
  }
}

function checkSize(width, height) {
  if (width > MAX_SIDE || height > MAX_SIDE || width * height > MAX_PIXELS) {
    throw new AppError(
      "too-large",
      `This image is too large (${width} x ${height} px). The limit is ${MAX_SIDE} px on a side and ${MAX_PIXELS / 1e6} megapixels.`,
    );
  }
}

/** Check bytes: returns {width, height, type} ("png", "jpg" or "dicom") or throws AppError. Pure. */
export function inspectBytes(bytes) {
  if (!bytes || bytes.length === 0) throw new AppError("empty", "The file is empty (0 bytes). Please pick an X-ray image.");
  if (isDicom(bytes)) {
    let info;
    try {
      info = parseDicom(bytes);
    } catch (e) {
      throw new AppError("decode", (e && e.message) || "This DICOM file could not be read.");
    }
    if (!(info.rows > 0 && info.columns > 0)) throw new AppError("decode", "This DICOM file has no image size (Rows/Columns).");
    checkSize(info.columns, info.rows);
    return { width: info.columns, height: info.rows, type: "dicom", dicom: info };
  }
  let info = null;
  try {
    info = imageSize(bytes);
  } catch {
    info = null;
  }
  const type = info && info.type;
  if (!info || (type !== "png" && type !== "jpg")) {
    throw new AppError(
      "not-image",
      "This file is not a PNG, JPEG or DICOM image. Please pick a chest X-ray picture (PNG, JPEG or DICOM).",
    );
  }
  const { width, height } = info;
  if (!(width > 0 && height > 0)) throw new AppError("not-image", "This image has no readable size. Please pick a PNG or JPEG X-ray.");
  checkSize(width, height);
  return { width, height, type };
}

/** A parsed DICOM (inspectBytes(...).dicom) to grey RGBA. Throws AppError("decode") naming what it cannot read. */
export async function decodeDicom(info) {
  let r;
  try {
    r = await dicomGrey(info);
  } catch (e) {
    if (e instanceof DicomError) throw new AppError("decode", e.message);
    throw new AppError("decode", `This DICOM image could not be decoded (${(e && e.message) || e}).`);
  }
  const { grey, width, height } = r;
  const rgba = new Uint8ClampedArray(width * height * 4);
  for (let i = 0; i < grey.length; i++) {
    rgba[4 * i] = rgba[4 * i + 1] = rgba[4 * i + 2] = grey[i];
    rgba[4 * i + 3] = 255;
  }
  return { rgba, width, height };
}

/**
 * Read picked bytes (already checked by inspectBytes): {rgba, width, height, blob}, where blob is
 * what the preview shows (the file itself, or a PNG of a DICOM's grey pixels: no DICOM attribute is kept).
 */
export async function readPicked(bytes, checked) {
  if (checked.type === "dicom") {
    const d = await decodeDicom(checked.dicom);
    return { ...d, blob: await pngBlob(d.rgba, d.width, d.height) };
  }
  const blob = new Blob([bytes], { type: checked.type === "png" ? "image/png" : "image/jpeg" });
  return { ...(await decodeToRgba(blob)), blob };
}

/** A PNG of RGBA pixels (the preview of a DICOM or of an edited picture), or null. */
export async function pngBlob(rgba, width, height) {
  try {
    if (typeof OffscreenCanvas !== "undefined") {
      const c = new OffscreenCanvas(width, height);
      c.getContext("2d").putImageData(new ImageData(rgba, width, height), 0, 0);
      return await c.convertToBlob({ type: "image/png" });
    }
    const c = document.createElement("canvas");
    c.width = width;
    c.height = height;
    c.getContext("2d").putImageData(new ImageData(rgba, width, height), 0, 0);
    return await new Promise((resolve) => c.toBlob(resolve, "image/png"));
  } catch {
    return null;
  }
}

/** Decode a Blob to RGBA bytes. Throws AppError("decode"). */
export async function decodeToRgba(blob) {
  let bitmap;
  try {
    // "from-image": a camera JPEG turned upright by its EXIF orientation, as the pipeline does.
    bitmap = await createImageBitmap(blob, {
      colorSpaceConversion: "none",
      premultiplyAlpha: "none",
      imageOrientation: "from-image",
    });
  } catch (e) {
    throw new AppError("decode", "The image could not be decoded. The file may be damaged or in an unsupported format.");
  }
  try {
    const { width, height } = bitmap;
    if (!(width > 0 && height > 0)) throw new AppError("decode", "The decoded image is empty.");
    let ctx;
    if (typeof OffscreenCanvas !== "undefined") {
      ctx = new OffscreenCanvas(width, height).getContext("2d", { willReadFrequently: true });
    } else {
      const c = document.createElement("canvas");
      c.width = width;
      c.height = height;
      ctx = c.getContext("2d", { willReadFrequently: true });
    }
    ctx.drawImage(bitmap, 0, 0);
    const data = ctx.getImageData(0, 0, width, height).data;
    return { rgba: data, width, height };
  } catch (e) {
    if (e instanceof AppError) throw e;
    throw new AppError("decode", "The image could not be read after decoding.");
  } finally {
    bitmap.close && bitmap.close();
  }
}
