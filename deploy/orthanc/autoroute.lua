-- Orthanc: auto-route stable X-ray studies to the fractured node.
--
-- Install: add this file to "LuaScripts" in Orthanc's configuration, declare the node
-- in "DicomModalities" as "fractured", and declare the user metadata "FracturedSent"
-- (see orthanc.json next to this file).
--
-- Only projection-radiograph series are sent, never the node's own SR / overlay series,
-- and each study once: OnStableStudy fires again when the results are stored back into
-- the study, so the study is marked with the metadata "FracturedSent" once sent.
local XRAY_MODALITIES = { CR = true, DX = true }
local NODE = 'fractured'

function OnStableStudy(studyId, tags, metadata)
  if metadata['FracturedSent'] ~= nil then
    return
  end
  local ids = {}
  for _, series in ipairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    if XRAY_MODALITIES[series['MainDicomTags']['Modality']] then
      table.insert(ids, series['ID'])
    end
  end
  if #ids > 0 then
    -- SendToModality() takes instance ids only; the REST route sends whole series, as
    -- an asynchronous job so that Orthanc's Lua engine is not blocked meanwhile.
    RestApiPost('/modalities/' .. NODE .. '/store',
                DumpJson({ Resources = ids, Asynchronous = true }, true))
    RestApiPut('/studies/' .. studyId .. '/metadata/FracturedSent', 'yes')
    print('fractured autoroute: sent ' .. #ids .. ' series of study ' .. studyId)
  end
end
