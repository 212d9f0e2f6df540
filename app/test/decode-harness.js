// Test harness (tests/test_app_decode.py): the app's own reading code, bundled alone by esbuild and
// loaded in Chromium. window.decodeForTest(bytes, size) runs exactly what a pick runs
// (inspectBytes -> readPicked -> preprocess) and hands back the grey pixels and the model input.
import { inspectBytes, readPicked } from "../src/image.js";
import { preprocess, toChannels } from "../src/preprocess.js";

function b64(u8) {
  let s = "";
  for (let i = 0; i < u8.length; i += 0x8000) s += String.fromCharCode.apply(null, u8.subarray(i, i + 0x8000));
  return btoa(s);
}

window.decodeForTest = async (base64, size) => {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  try {
    const checked = inspectBytes(bytes);
    const { rgba, width, height } = await readPicked(bytes, checked);
    const grey = Uint8Array.from(toChannels(rgba, width, height, 1));
    const input = Uint8Array.from(preprocess(rgba, width, height, size, 1));
    return { type: checked.type, width, height, grey: b64(grey), input: b64(input) };
  } catch (e) {
    return { error: String((e && e.message) || e), kind: (e && e.kind) || null };
  }
};
// What a pick keeps: the keys of readPicked's result and the preview blob.
window.pickedForTest = async (base64) => {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  const picked = await readPicked(bytes, inspectBytes(bytes));
  const preview = new Uint8Array(await picked.blob.arrayBuffer());
  return { keys: Object.keys(picked).sort(), type: picked.blob.type, preview: b64(preview) };
};
window.harnessReady = true;
