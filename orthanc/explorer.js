/**
 * orthanc-ai: the "AI" panel of Orthanc Explorer's study and series pages.
 *
 * Registered by plugin/adapter.py with orthanc.ExtendOrthancExplorer(); Orthanc
 * appends it to ../plugins/explorer.js, which explorer.html loads after its own
 * explorer.js (jQuery Mobile 1.x with jQuery < 1.9: hence .live(), as Orthanc's
 * own pages and its other plugins use). Every URL is relative to
 * /app/explorer.html, so the panel works behind a reverse proxy too.
 *
 * What it shows comes from GET ../ai/studies/{id}: the study's analyses (model,
 * state, reason, attempts), their findings in words, links to the SRs in
 * Explorer, the prior search and the SRs' deliveries, and an "Open in OHIF"
 * link by StudyInstanceUID. Values are inserted with .text() / .attr(), never
 * as HTML. While an analysis is queued or running, the panel refreshes itself.
 *
 * DOM for tests: #orthanc-ai-panel (data-study, data-state="loaded"|"error"),
 * #orthanc-ai-ohif, .orthanc-ai-finding, table.orthanc-ai-jobs tr[data-job-id].
 */

(function () {
  var PANEL_ID = 'orthanc-ai-panel';
  var REFRESH_MS = 5000;
  var shown = null;  // {page, uuid, token} of the panel on screen
  var timer = null;
  var tokens = 0;

  function cell(text) {
    return $('<td>').css({ padding: '2px 6px', 'vertical-align': 'top' })
      .text(text === null || text === undefined || text === '' ? '\u2014' : String(text));
  }

  function link(text, href, blank) {
    var a = $('<a>').attr('href', href).text(text);
    if (blank) {
      a.attr('target', '_blank').attr('rel', 'noopener');
    }
    return a;
  }

  // With our SR's series, OHIF opens that SR: the finding drawn, a CT on its key slice.
  function ohifUrl(studyInstanceUid, srSeriesUid) {
    return '../ohif/viewer?StudyInstanceUIDs=' + encodeURIComponent(studyInstanceUid) +
      (srSeriesUid ? '&initialSeriesInstanceUID=' + encodeURIComponent(srSeriesUid) : '');
  }

  function current(token) {
    return shown !== null && shown.token === token && $('#' + PANEL_ID).length > 0;
  }

  function render(panel, info, seriesId) {
    var body = $('<div>').addClass('orthanc-ai-body');
    var jobs = info.jobs || [];
    var busy = false;

    if (info.study_instance_uid) {
      body.append($('<p>').append(
        link('Open in OHIF', ohifUrl(info.study_instance_uid), true)
          .attr('id', 'orthanc-ai-ohif')
          .css({ display: 'inline-block', padding: '4px 12px', border: '1px solid #888',
                 'border-radius': '4px', 'text-decoration': 'none', 'font-weight': 'bold' })));
    }

    var findings = $('<ul>').addClass('orthanc-ai-findings');
    $.each(info.findings || [], function (i, f) {
      var li = $('<li>').addClass('orthanc-ai-finding')
        .attr('data-job-id', f.job)
        .append($('<strong>').text(f.summary || f.finding || ''))
        .append($('<span>').text(' (' + (f.model || '') + ' ' + (f.model_version || '') + ')'));
      if (f.sr_instance) {
        li.append(' ').append(link('SR', '#instance?uuid=' + encodeURIComponent(f.sr_instance))
                                .addClass('orthanc-ai-sr'));
      }
      if (info.study_instance_uid && f.sr_series_instance_uid) {
        li.append(' ').append(link('in OHIF', ohifUrl(info.study_instance_uid,
                                                      f.sr_series_instance_uid), true)
                                .addClass('orthanc-ai-finding-ohif'));
      }
      if (seriesId && f.series === seriesId) {
        li.append($('<em>').text(' this series'));
      }
      findings.append(li);
    });
    if ((info.findings || []).length === 0) {
      findings.append($('<li>').text(jobs.length === 0 ?
        'No AI analysis for this study (yet).' : 'No finding yet.'));
    }
    body.append($('<h4>').text('Findings').css('margin', '0.5em 0 0')).append(findings);

    if (jobs.length > 0) {
      var table = $('<table>').addClass('orthanc-ai-jobs')
        .css({ 'border-collapse': 'collapse', width: '100%', 'font-size': '90%' });
      var head = $('<tr>');
      $.each(['Job', 'Model', 'State', 'Reason', 'Attempts', 'Finding'], function (i, h) {
        head.append($('<th>').css({ 'text-align': 'left', padding: '2px 6px' }).text(h));
      });
      table.append($('<thead>').append(head));
      var rows = $('<tbody>');
      $.each(jobs, function (i, j) {
        busy = busy || j.state === 'queued' || j.state === 'running';
        var model = j.model ? j.model + (j.model_version ? ' ' + j.model_version : '') : null;
        var reason = j.reason || '';
        if (j.next_attempt) {
          reason += (reason ? '; ' : '') + 'next attempt ' + j.next_attempt;
        }
        var row = $('<tr>').attr('data-job-id', j.id).attr('data-state', j.state)
          .append(cell(j.id)).append(cell(model)).append(cell(j.state))
          .append(cell(reason)).append(cell(j.attempts)).append(cell(j.summary));
        if (seriesId && j.series === seriesId) {
          row.css('font-weight', 'bold');
        }
        rows.append(row);
      });
      table.append(rows);
      body.append($('<h4>').text('Analyses').css('margin', '0.5em 0 0')).append(table);
    }

    var notes = $('<p>').addClass('orthanc-ai-notes').css('font-size', '90%');
    if (info.priors) {
      var p = info.priors;
      var status = (p.result && p.result.status) ? ' (' + p.result.status + ')' : '';
      notes.append($('<div>').text('Prior search: ' + p.state + status +
                                   (p.reason ? ': ' + p.reason : '')));
    }
    $.each(info.deliveries || [], function (i, d) {
      notes.append($('<div>').addClass('orthanc-ai-delivery').text(
        (d.kind === 'hl7' ? 'HL7 to ' : 'Forward to ') + d.destination + ': ' + d.state +
        (d.reason ? ' (' + d.reason + ')' : '')));
    });
    notes.append($('<div>').append(link('AI status of this Orthanc', '../ai/')));
    body.append(notes);

    panel.find('.orthanc-ai-body').remove();
    panel.append(body).attr('data-state', 'loaded');
    return busy;
  }

  function load(token, studyId, seriesId) {
    $.ajax({
      url: '../ai/studies/' + encodeURIComponent(studyId),
      dataType: 'json',
      cache: false,
      success: function (info) {
        if (!current(token)) {
          return;
        }
        var busy = render($('#' + PANEL_ID), info, seriesId);
        if (busy) {
          timer = setTimeout(function () { load(token, studyId, seriesId); }, REFRESH_MS);
        }
      },
      error: function (xhr) {
        if (!current(token)) {
          return;
        }
        $('#' + PANEL_ID).attr('data-state', 'error').find('.orthanc-ai-body')
          .text('The AI state of this study could not be read (HTTP ' + xhr.status + ').');
      }
    });
  }

  function show(page) {
    var uuid = $.mobile.pageData ? $.mobile.pageData.uuid : undefined;
    if (typeof uuid !== 'string' || uuid.length === 0) {
      return;
    }
    if (timer !== null) {
      clearTimeout(timer);
      timer = null;
    }
    tokens += 1;
    shown = { page: page, uuid: uuid, token: tokens };
    var token = tokens;

    // One panel in the document (ids are unique), at the top of the page's right-hand
    // column, above the list of series (instances) and its filter box.
    $('#' + PANEL_ID).remove();
    var panel = $('<div>').attr('id', PANEL_ID).attr('data-state', 'loading')
      .addClass('ui-body ui-body-c ui-corner-all')
      .css({ 'margin-bottom': '1em', padding: '0.5em 1em' })
      .append($('<h3>').text('AI').css('margin', '0.2em 0'))
      .append($('<div>').addClass('orthanc-ai-body').text('Loading\u2026'));
    if (page === 'study') {
      panel.attr('data-study', uuid).prependTo($('#list-series').parent());
      load(token, uuid, null);
    } else {
      panel.attr('data-series', uuid).prependTo($('#list-instances').parent());
      $.ajax({
        url: '../series/' + encodeURIComponent(uuid),
        dataType: 'json',
        cache: false,
        success: function (series) {
          if (current(token)) {
            $('#' + PANEL_ID).attr('data-study', series.ParentStudy);
            load(token, series.ParentStudy, uuid);
          }
        }
      });
    }
  }

  $('#study').live('pagebeforeshow', function () { show('study'); });
  $('#series').live('pagebeforeshow', function () { show('series'); });

  $(document).live('pagebeforehide', function () {
    if (timer !== null) {
      clearTimeout(timer);
      timer = null;
    }
    shown = null;
  });

  // Explorer refreshes a page in place when only its uuid changes (back button,
  // "before anonymization"): follow it.
  $(window).bind('hashchange', function () {
    var data = $.mobile.pageData;
    if (shown !== null && data && data.active === shown.page && data.uuid !== shown.uuid) {
      show(shown.page);
    }
  });
})();
