/** OHIF configuration for orthanc-ai: the viewer served by the plugin at
 * /ohif/, reading studies from the same Orthanc's DICOMweb plugin (same
 * origin, same authentication). `orthanc-ai` installs it as app-config.js,
 * with the path the viewer is served under as its prefix.
 *
 * The settings below worked with Orthanc's DICOMweb plugin 1.7 (Debian 12):
 * no includefield in QIDO, unquoted multipart types, bulk data by URI.
 */
(function () {
  const prefix = '@@PREFIX@@'; // e.g. "/ohif/"
  // Orthanc's root: the viewer's path without its last segment.
  const orthanc = prefix.replace(/[^/]+\/$/, '');
  const dicomweb = orthanc + 'dicom-web';

  window.config = {
    name: 'orthanc-ai',
    routerBasename: prefix.replace(/\/$/, ''),
    extensions: [],
    modes: [],
    // No onboarding tour over the first image a radiologist opens.
    customizationService: { global: { 'ohif.tours': { $set: [] } } },
    showStudyList: true,
    maxNumberOfWebWorkers: 3,
    showWarningMessageForCrossOrigin: false,
    showCPUFallbackMessage: true,
    showLoadingIndicator: true,
    strictZSpacingForVolumeViewport: true,
    groupEnabledModesFirst: true,
    // The study is opened from Orthanc Explorer or a printed link: no
    // investigational-use prompt in front of it (the SR says what made it).
    investigationalUseDialog: { option: 'never' },
    maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 10 },
    showErrorDetails: 'always',
    defaultDataSourceName: 'orthanc',
    dataSources: [
      {
        namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
        sourceName: 'orthanc',
        configuration: {
          friendlyName: 'Orthanc (orthanc-ai)',
          name: 'orthanc',
          wadoUriRoot: dicomweb,
          qidoRoot: dicomweb,
          wadoRoot: dicomweb,
          qidoSupportsIncludeField: false,
          imageRendering: 'wadors',
          thumbnailRendering: 'wadors',
          enableStudyLazyLoad: true,
          supportsFuzzyMatching: false,
          supportsWildcard: true,
          staticWado: false,
          singlepart: 'bulkdata,video',
          bulkDataURI: { enabled: true, relativeResolution: 'studies' },
          omitQuotationForMultipartRequest: true,
        },
      },
    ],
  };
})();
