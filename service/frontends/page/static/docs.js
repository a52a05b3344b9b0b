// Swagger UI on the API's own OpenAPI document (BentoML's /docs.json embeds its README, with badge images from third parties), with the files BentoML ships (no CDN).
"use strict";
window.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
  });
});
