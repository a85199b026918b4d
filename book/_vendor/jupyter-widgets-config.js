// detptq-mini (not vendored): make the vendored ipywidgets embed manager work offline
// next to the vendored MathJax 3. Load after require.js and before embed-amd.js
// (html_js_files in _config.yml).
(function () {
  // 1. Asset paths. embed-amd.js defines its modules under RequireJS ids
  // ("@jupyter-widgets/controls", "@jupyter-widgets/html-manager/dist/libembed-amd", ...)
  // and resolves its bundled fonts relative to the id's URL, by default in the page's
  // own folder (book/@jupyter-widgets/...: 404). Map both prefixes to _static/, the
  // folder of this script, where the fonts sit next to embed-amd.js.
  var staticDir = document.currentScript.src.replace(/[^/]*([?#].*)?$/, "");
  window.__jupyter_widgets_assets_path__ = staticDir;
  window.require.config({
    paths: {
      "@jupyter-widgets": staticDir.replace(/\/$/, ""),
      "@jupyter-widgets/html-manager/dist": staticDir.replace(/\/$/, ""),
    },
  });

  // 2. MathJax. The widgets typeset their labels with the MathJax 2 call
  // MathJax.Hub.Queue(["Typeset", MathJax.Hub, element]); with MathJax 3 on the page
  // that throws "Cannot read properties of undefined (reading 'Queue')". Give them
  // that one call, done the MathJax 3 way. The widgets render on window load, after
  // the deferred MathJax script has run, and this listener is registered first.
  window.addEventListener("load", function () {
    var mj = window.MathJax;
    if (mj && mj.typesetPromise && mj.startup && !mj.Hub) {
      mj.Hub = {
        Queue: function (job) {
          var el = job && job[2];
          mj.startup.promise = mj.startup.promise.then(function () {
            return mj.typesetPromise(el ? [el] : undefined);
          });
        },
      };
    }
  });
})();
