// Bundles src/App.jsx with esbuild and puts it next to index.html in one directory to serve.
//
//   node build.mjs [OUT_DIR]          (npm run build: OUT_DIR is build/)
//
// TOKENWIRE_URL (for example http://127.0.0.1:8000) is where tokenwire runs, when the page is
// served from another origin; start tokenwire with --cors-origins <the page's origin> then.
// Without it the page calls /api/chat on its own origin.
import { copyFile, mkdir } from "node:fs/promises";
import { join } from "node:path";
import { build } from "esbuild";

const here = new URL(".", import.meta.url).pathname;
const out = process.argv[2] ?? join(here, "build");
await mkdir(out, { recursive: true });
await build({
  entryPoints: [join(here, "src", "App.jsx")],
  bundle: true,
  format: "esm",
  jsx: "automatic",
  define: {
    "process.env.NODE_ENV": '"production"',
    TOKENWIRE_URL: JSON.stringify((process.env.TOKENWIRE_URL ?? "").replace(/\/+$/, "")),
  },
  outfile: join(out, "app.js"),
  minify: true,
  logLevel: "warning",
});
await copyFile(join(here, "index.html"), join(out, "index.html"));
