-- Orthanc: auto-route the X-ray series of a stable study to the fractured node.
--
-- Install: copy this file to /etc/orthanc/fractured-autoroute.lua and name it in
-- "LuaScripts"; declare the node in "DicomModalities" as "fractured" and the user
-- metadata "FracturedSent" in "UserMetadata" (see orthanc.json next to this file and
-- docs/pacs-setup.md).
--
-- Only CR and DX series are sent, never the node's own SR and overlay (OT) series, and
-- each series once: OnStableStudy fires again whenever objects are added to the study
-- (the node's results among them), so each series sent is marked with the metadata
-- "FracturedSent" = how many instances it had. A series that gains instances later is
-- sent again whole (the node keeps one copy of an image it already holds), and an
-- X-ray series added to the study later is sent on its own; the node then analyses
-- the study again and sends new results.
--
-- The send is an asynchronous Orthanc job, so the Lua engine is not blocked meanwhile;
-- a series is marked when its job is created. A job that fails (the node down) is
-- listed under Jobs in Orthanc Explorer and can be resubmitted there
-- (POST /jobs/{id}/resubmit).
local XRAY_MODALITIES = { CR = true, DX = true }
local NODE = 'fractured'
local SENT = 'FracturedSent'

-- How many instances of the series were sent (0: never).
local function sentCount(seriesId)
  for _, name in ipairs(ParseJson(RestApiGet('/series/' .. seriesId .. '/metadata'))) do
    if name == SENT then
      return tonumber(RestApiGet('/series/' .. seriesId .. '/metadata/' .. SENT)) or 0
    end
  end
  return 0
end

function OnStableStudy(studyId, tags, metadata)
  local ids, counts = {}, {}
  for _, series in ipairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    local count = #series['Instances']
    if XRAY_MODALITIES[series['MainDicomTags']['Modality']]
        and count > sentCount(series['ID']) then
      table.insert(ids, series['ID'])
      counts[series['ID']] = count
    end
  end
  if #ids > 0 then
    -- SendToModality() takes instance ids only; the REST route sends whole series.
    RestApiPost('/modalities/' .. NODE .. '/store',
                DumpJson({ Resources = ids, Asynchronous = true }, true))
    for _, id in ipairs(ids) do
      RestApiPut('/series/' .. id .. '/metadata/' .. SENT, tostring(counts[id]))
    end
    print('fractured autoroute: sent ' .. #ids .. ' series of study ' .. studyId)
  end
end
