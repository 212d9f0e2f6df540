// Service worker: precache every file of the bundle (the list is injected at
// bundle time by replacing the self.__WB_MANIFEST literal) and serve from the
// cache, so the app works offline after the first visit.
import { precacheAndRoute, cleanupOutdatedCaches } from "workbox-precaching";

self.addEventListener("install", () => {
  self.skipWaiting();
});

self.addEventListener("activate", (event) => {
  event.waitUntil(self.clients.claim());
});

cleanupOutdatedCaches();
precacheAndRoute(self.__WB_MANIFEST, { ignoreURLParametersMatching: [/.*/] });
