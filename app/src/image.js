// Reading a picked file: validate the bytes (type, dimensions) BEFORE decoding,
// then decode to RGBA without colour-space conversion or premultiplication.
import { imageSize } from "image-size";

export const MAX_SIDE = 8192;
export const MAX_PIXELS = 40_000_000;

export class AppError extends Error {
  constructor(kind, message) {
    super(message);
    this.kind = kind;
  }
}

/** Check bytes: returns {width, height, type} or throws AppError. Pure. */
export function inspectBytes(bytes) {
  if (!bytes || bytes.length === 0) throw new AppError("empty", "The file is empty (0 bytes). Please pick an X-ray image.");
  let info = null;
  try {
    info = imageSize(bytes);
  } catch {
    info = null;
  }
  const type = info && info.type;
  if (!info || (type !== "png" && type !== "jpg")) {
    throw new AppError("not-image", "This file is not a PNG or JPEG image. Please pick a chest X-ray picture (PNG or JPEG).");
  }
  const { width, height } = info;
  if (!(width > 0 && height > 0)) throw new AppError("not-image", "This image has no readable size. Please pick a PNG or JPEG X-ray.");
  if (width > MAX_SIDE || height > MAX_SIDE || width * height > MAX_PIXELS) {
    throw new AppError(
      "too-large",
      `This image is too large (${width} x ${height} px). The limit is ${MAX_SIDE} px on a side and ${MAX_PIXELS / 1e6} megapixels.`,
    );
  }
  return { width, height, type };
}

/** Decode a Blob to RGBA bytes. Throws AppError("decode"). */
export async function decodeToRgba(blob) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
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
