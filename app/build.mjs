// Build: bundle the app and the service worker with esbuild, copy static files
// and LiteRT's wasm runtime into dist/.
import * as esbuild from "esbuild";
import { cpSync, existsSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync } from "node:fs";
import { dirname, join } from "node:path";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

const root = dirname(fileURLToPath(import.meta.url));
const dist = join(root, "dist");
const require = createRequire(import.meta.url);
const allWasm = process.argv.includes("--all-wasm");

rmSync(dist, { recursive: true, force: true });
mkdirSync(dist, { recursive: true });

const common = { bundle: true, minify: true, platform: "browser", logLevel: "warning", legalComments: "linked" };
// The OpenJPEG glue (Emscripten) names node's fs/path in a branch that never runs in a browser.
const nodeOnly = ["fs", "path"];

await esbuild.build({
  ...common,
  entryPoints: [join(root, "src/main.js")],
  outfile: join(dist, "app.js"),
  format: "esm",
  target: ["es2022", "chrome109", "safari16.4", "firefox115"],
  sourcemap: true,
  external: nodeOnly,
});

// The models run in a classic worker (LiteRT.js loads its WASM glue with importScripts there).
await esbuild.build({
  ...common,
  entryPoints: [join(root, "src/inference-worker.js")],
  outfile: join(dist, "inference-worker.js"),
  format: "iife",
  target: ["es2022", "chrome109", "safari16.4", "firefox115"],
  sourcemap: true,
});

await esbuild.build({
  ...common,
  entryPoints: [join(root, "src/sw.js")],
  outfile: join(dist, "sw.js"),
  format: "iife",
  target: ["es2020"],
  sourcemap: false,
  // Workbox picks its dev/prod build from process.env.NODE_ENV.
  define: { "process.env.NODE_ENV": '"production"' },
});

// The Python side replaces this literal with the precache manifest.
const sw = readFileSync(join(dist, "sw.js"), "utf8");
const count = sw.split("self.__WB_MANIFEST").length - 1;
if (count !== 1) {
  console.error(`build: dist/sw.js must contain "self.__WB_MANIFEST" exactly once, found ${count}`);
  process.exit(1);
}

for (const f of ["index.html", "style.css", "manifest.webmanifest"]) cpSync(join(root, f), join(dist, f));
cpSync(join(root, "icons"), join(dist, "icons"), { recursive: true });

// LiteRT.js wasm runtime. By default only the two variants this app loads
// (plain and "compat" for browsers without relaxed SIMD; no threads, no JSPI),
// which halves what a phone precaches. --all-wasm copies the whole folder.
const coreDir = dirname(require.resolve("@litertjs/core/package.json"));
const wasmDir = join(coreDir, "wasm");
if (!existsSync(wasmDir)) {
  console.error(`build: LiteRT wasm folder not found at ${wasmDir}`);
  process.exit(1);
}
mkdirSync(join(dist, "wasm"));
const wanted = allWasm
  ? readdirSync(wasmDir)
  : ["litert_wasm_internal.js", "litert_wasm_internal.wasm", "litert_wasm_compat_internal.js", "litert_wasm_compat_internal.wasm"];
for (const f of wanted) {
  if (!existsSync(join(wasmDir, f))) {
    console.error(`build: missing ${f} in ${wasmDir}`);
    process.exit(1);
  }
  cpSync(join(wasmDir, f), join(dist, "wasm", f));
}

// The JPEG 2000 decoder for DICOM (OpenJPEG in WebAssembly), loaded only when a JPEG 2000 DICOM is opened.
const j2k = require.resolve("@cornerstonejs/codec-openjpeg/decodewasm");
if (!existsSync(j2k)) {
  console.error(`build: missing ${j2k}`);
  process.exit(1);
}
mkdirSync(join(dist, "codecs"));
cpSync(j2k, join(dist, "codecs", "openjpegwasm_decode.wasm"));

const list = (d, p = "") =>
  readdirSync(d).flatMap((n) => (statSync(join(d, n)).isDirectory() ? list(join(d, n), `${p}${n}/`) : [`${p}${n}`]));
const files = list(dist);
const total = files.reduce((s, f) => s + statSync(join(dist, f)).size, 0);
console.log(`build: dist/ ${files.length} files, ${(total / 1e6).toFixed(1)} MB`);
for (const f of files) console.log(`  ${f}`);
