// Service worker: keep the app for offline use without downloading more than
// the first result needs.
//
// The Python side replaces the self.__WB_MANIFEST literal with the bundle's
// file list: [{url, revision, lazy?}] (url relative to the bundle root,
// revision = md5). On install the worker caches the entries without `lazy`
// (page, app.json, guard, the default model's files) and, of LiteRT's two WASM
// builds, only the one this browser loads. Lazy entries (other models, plots)
// are cached the first time the page fetches them. Each file is cached under
// its URL plus its revision, so a new bundle replaces exactly the files that
// changed; the install request revalidates with the HTTP cache (ETag), so a
// file the page has just downloaded is not downloaded a second time.
const MANIFEST = self.__WB_MANIFEST;
const CACHE = "covid-xray-app";
const REVISION = "__rev";

// LiteRT.js picks its WASM build by this check (@litertjs/core,
// WASM_RELAXED_SIMD_CHECK): with relaxed SIMD the plain build, else "compat".
const RELAXED_SIMD = new Uint8Array([
  0, 97, 115, 109, 1, 0, 0, 0, 1, 5, 1, 96, 0, 1, 123, 3, 2, 1, 0, 10, 15, 1, 13, 0, 65, 1, 253, 15, 65, 2, 253, 15,
  253, 128, 2, 11,
]);

function relaxedSimd() {
  try {
    return WebAssembly.validate(RELAXED_SIMD);
  } catch {
    return false;
  }
}

const scope = new URL(self.registration.scope);
const absolute = (url) => new URL(url, scope).href;
const entries = new Map(MANIFEST.map((e) => [absolute(e.url), e]));
const cacheKey = (e) => `${absolute(e.url)}?${REVISION}=${e.revision}`;

function unusedWasm(url) {
  if (!url.startsWith("wasm/litert_wasm_")) return false;
  const compat = url.includes("_compat_");
  return relaxedSimd() ? compat : !compat;
}

function precached() {
  return MANIFEST.filter((e) => !e.lazy && !unusedWasm(e.url));
}

async function store(cache, e, response) {
  if (response.ok && response.status === 200 && !response.redirected) {
    await cache.put(cacheKey(e), response.clone());
  }
  return response;
}

self.addEventListener("install", (event) => {
  event.waitUntil(
    (async () => {
      const cache = await caches.open(CACHE);
      for (const e of precached()) {
        if (await cache.match(cacheKey(e))) continue;
        // "no-cache": revalidate what the HTTP cache holds (the page's own downloads) instead of fetching it again.
        const response = await fetch(absolute(e.url), { cache: "no-cache", credentials: "same-origin" });
        if (!response.ok) throw new Error(`${e.url}: HTTP ${response.status}`);
        await store(cache, e, response);
      }
      await self.skipWaiting();
    })(),
  );
});

self.addEventListener("activate", (event) => {
  event.waitUntil(
    (async () => {
      const keep = new Set(MANIFEST.map(cacheKey));
      const cache = await caches.open(CACHE);
      for (const request of await cache.keys()) if (!keep.has(request.url)) await cache.delete(request);
      await self.clients.claim();
    })(),
  );
});

function entryFor(request) {
  if (request.method !== "GET") return null;
  const url = new URL(request.url);
  if (url.origin !== scope.origin) return null;
  url.search = "";
  url.hash = "";
  const href = url.href === scope.href ? absolute("index.html") : url.href;
  return entries.get(href) || null;
}

self.addEventListener("fetch", (event) => {
  const e = entryFor(event.request);
  if (!e) return; // not a bundle file: the network as usual
  event.respondWith(
    (async () => {
      const cache = await caches.open(CACHE);
      const hit = await cache.match(cacheKey(e));
      if (hit) return hit;
      const response = await fetch(absolute(e.url), { credentials: "same-origin" });
      return store(cache, e, response);
    })(),
  );
});
